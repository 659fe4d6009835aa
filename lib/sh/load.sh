# load FILE CLI: loads the gzipped image archive FILE with CLI. docker load reads gzip itself,
# Debian's podman 4.3 cannot (a gzipped docker-archive fails with "unexpected EOF"): it is
# decompressed for both. Its sha256 was checked first.
gzip -dc -- "$1" | "$2" load
