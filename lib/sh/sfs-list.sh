# sfs-list DIR: prints, NUL-separated, the regular files *.tar.gz in DIR; exit 3 when DIR is not a
# directory.
cd -- "$1" 2>/dev/null || exit 3
for f in *.tar.gz; do
  if [ -f "$f" ] && [ ! -L "$f" ]; then printf '%s\0' "$f"; fi
done
exit 0
