# is-mount-point DIR: exit 0 when DIR is a mount point, 1 when it is not, 2 when it is not even a
# directory. mountpoint(1) reads the kernel's mount table (a bind mount counts); without it, a
# device that differs from its parent's.
[ -d "$1" ] || exit 2
if command -v mountpoint >/dev/null 2>&1; then
  mountpoint -q -- "$1"
  exit $?
fi
[ "$(stat -c %d -- "$1")" != "$(stat -c %d -- "$1/..")" ]
