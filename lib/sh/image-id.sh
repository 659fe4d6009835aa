# image-id CLI IMAGE: the image's ID; exit 127 when CLI is not installed, 3 when no such image is
# loaded.
command -v "$1" >/dev/null 2>&1 || exit 127
"$1" image inspect --format '{{.Id}}' "$2" || exit 3
