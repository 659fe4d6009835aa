# bring-and-run BYTES: runs our code on Verda, brought over the run's one connection. The first
# BYTES of stdin are the Verda bundle (dist/verda.mjs): written into a new private directory, then
# run by Node, which reads the request that follows on the same stdin and removes the directory
# once loaded. 127: no Node.js on the PATH of a non-interactive SSH login; 126: one older than
# 20.15 (zlib.crc32), its version said.
command -v node >/dev/null 2>&1 || exit 127
v=$(node --version 2>/dev/null)
case $v in
  v20.1[5-9].* | v20.[2-9][0-9].* | v2[1-9].* | v[3-9][0-9].* | v[1-9][0-9][0-9].*) ;;
  *)
    printf 'node %s\n' "$v" >&2
    exit 126
    ;;
esac
umask 077
d=$(mktemp -d "${TMPDIR:-/tmp}/comfymulti-verda.XXXXXXXX") || exit 1
head -c "$1" > "$d/verda.mjs" || {
  rm -rf -- "$d"
  exit 1
}
exec node "$d/verda.mjs"
