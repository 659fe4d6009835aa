# $0 is MELLO_SCRIPTS_DIR (`~` is Mello's home: the user backup-cron logs in as, not root's on
# Verda, so it is expanded here), $1 is backup-mello.mts, the rest its flags. Where Verda's key is
# a forced command (install --mello-trigger-key), no shell runs this: lib/mello-trigger.sh takes
# the words after the last `backup-mello.mts` as flags, from its allow-list.
d=$0
shift
# shellcheck disable=SC2088 # a literal `~` is what is matched: it is expanded here, by hand
case $d in
  '~') d=$HOME ;;
  '~/'*) d=$HOME/${d#'~/'} ;;
esac
# 66 (EX_NOINPUT): lib/trigger.ts says which variable to fix, once, instead of the shell's words.
[ -d "$d" ] || exit 66
cd -- "$d" && exec ./backup-mello.mts "$@"
