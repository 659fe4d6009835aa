# store DIR NAME SHA256: stores stdin as DIR/NAME through a temporary name, created exclusively;
# read back from disk and renamed only when its sha256 is SHA256. The temporary file goes
# whatever happens.
set -e
dir=$1
name=$2
want=$3
mkdir -p -- "$dir"
tmp=$dir/.$name.partial-$$
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 1' HUP INT TERM
set -C
cat > "$tmp"
set +C
sync -- "$tmp"
got=$(sha256sum -- "$tmp")
got=${got%% *}
if [ "$got" != "$want" ]; then
  echo "the bytes received have sha256 $got, not $want" >&2
  exit 3
fi
mv -f -- "$tmp" "$dir/$name"
trap - EXIT
