# present BASE ENTRY...: prints, NUL-separated, `P` and each entry that exists under BASE (a
# trailing `*` is expanded by the shell's glob), and `U` and a name that exists and cannot be read
# (BASE itself, or a glob's directory): an unprivileged run must not take it for "none".
[ -e "$1" ] || exit 0
cd -- "$1" 2>/dev/null || { printf 'U.\0'; exit 0; }
shift
for entry do
  case "$entry" in
    *'*')
      dir=${entry%/*}
      if [ -d "$dir" ] && { [ ! -r "$dir" ] || [ ! -x "$dir" ]; }; then
        printf 'U%s\0' "$dir"
        continue
      fi
      # shellcheck disable=SC2086 # the glob is the point
      for f in $entry; do
        if [ -e "$f" ] || [ -L "$f" ]; then printf 'P%s\0' "$f"; fi
      done
      ;;
    *) if [ -e "$entry" ] || [ -L "$entry" ]; then printf 'P%s\0' "$entry"; fi ;;
  esac
done
exit 0
