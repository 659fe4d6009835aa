# sha256 FILE: sha256sum of FILE (a regular file, not a symlink); exit 3 when it is not there.
if [ ! -f "$1" ] || [ -L "$1" ]; then exit 3; fi
exec sha256sum -- "$1"
