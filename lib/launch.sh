#!/bin/sh
# Starts a script (the first two lines of every backup-*.mts call this): its bundle in dist/
# while that is newer than every source, else the TypeScript itself through tsx. Both are found
# beside the script, whatever the working directory (cron runs from /). The `--` keeps Node 20
# from taking the script's --env-file for its own option.
script=$(readlink -f "$1")
shift
dir=$(dirname "$script")
bundle=$dir/dist/$(basename "$script" .mts).mjs
if [ -f "$bundle" ] && [ -z "$(find "$dir/lib" "$script" -newer "$bundle" -print 2>/dev/null | head -n 1)" ]; then
  exec node "$bundle" -- "$@"
fi
exec node --import "$dir/node_modules/tsx/dist/loader.mjs" "$script" -- "$@"
