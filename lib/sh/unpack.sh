# unpack ROOT BASE: unpacks a gzipped tar from stdin into ROOT/BASE. Each component of BASE under
# ROOT is looked at with lstat (`test -L`) before it is made or entered: a symlink there (one an
# earlier archive restored) ends it (exit 3), so nothing is written through it. ROOT itself (`/`,
# --root, the drill's directory) is the admin's, made if missing. GNU tar runs without
# --keep-directory-symlink, --dereference or -P, and keeps mode (also for a user that is not
# root), mtime, and as root the owner (by name, as the SPEC's `tar -xzf F -C DIR`).
dest=$1
rel=$2
mkdir -p -- "$dest" || exit 1
set -f
IFS=/
for part in $rel; do
  [ -n "$part" ] || continue
  dest=${dest%/}/$part
  if [ -L "$dest" ]; then
    printf '%s is a symlink: not followed, nothing unpacked\n' "$dest" >&2
    exit 3
  fi
  [ -d "$dest" ] || mkdir -- "$dest" || exit 1
done
unset IFS
exec tar --extract --gzip --file=- --directory="$dest" --preserve-permissions
