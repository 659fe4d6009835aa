#!/bin/sh
# The forced command of Verda's key on Mello (see `./install --mello-trigger-key` and README "Trust
# between the machines"): sshd runs this instead of whatever the client asked for, whose text is
# in SSH_ORIGINAL_COMMAND. It runs the backup-mello.mts beside it (in MELLO_SCRIPTS_DIR) and
# nothing else, with flags from an allow-list.
#
# SSH_ORIGINAL_COMMAND is never evaluated by a shell: it is split into words at whitespace (no
# globbing, no quotes, no expansion). backup-cron sends `sh -c '...' backup-mello.mts FLAGS`, which
# also works on a Mello without this forced command; here everything up to the last word
# `backup-mello.mts` only names the script and is ignored (it is never run). The words after it,
# or the whole line when it does not name the script, must each be an allowed flag. Anything else
# is refused with exit 2 and a line saying why.
set -eu

allowed='--quick --full --verify --deep -v --verbose'

refuse() {
  printf 'backup-mello (forced command for this key): refused: %s; allowed: %s\n' "$1" "$allowed" >&2
  exit 2
}

cmd=${SSH_ORIGINAL_COMMAND-}
flags=$cmd
case $cmd in
  backup-mello.mts | *[[:space:]/]backup-mello.mts) flags= ;;
  backup-mello.mts[[:space:]]* | *[[:space:]/]backup-mello.mts[[:space:]]*)
    flags=${cmd##*backup-mello.mts}
    # The last `backup-mello.mts` must be a word of its own (or a path's last part), not `xbackup-mello.mts`.
    head=${cmd%"$flags"}
    case $head in backup-mello.mts | *[[:space:]/]backup-mello.mts) ;; *) flags=$cmd ;; esac
    ;;
esac

set -f # no globbing of the words below
for word in $flags; do
  case $word in
    --quick | --full | --verify | --deep | -v | --verbose) ;;
    -*) refuse "flag \"$(printf '%s' "$word" | head -c 80)\" is not allowed over this key" ;;
    *) refuse "\"$(printf '%s' "$word" | head -c 80)\" is not a flag: this key runs backup-mello.mts only" ;;
  esac
done

here=$(dirname "$(readlink -f "$0")")
dir=${here%/lib}
cd -- "$dir"
# shellcheck disable=SC2086 # the words were checked one by one above
exec ./backup-mello.mts $flags
