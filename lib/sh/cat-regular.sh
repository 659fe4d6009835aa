# cat-regular FILE: prints FILE when it is a regular file (never through a symlink, never a FIFO).
if [ ! -f "$1" ] || [ -L "$1" ]; then
  echo "not a regular file" >&2
  exit 3
fi
exec cat -- "$1"
