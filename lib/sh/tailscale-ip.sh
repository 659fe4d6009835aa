# tailscale-ip: Tailscale's IPv4 address; exit 127 when there is no tailscale.
command -v tailscale >/dev/null 2>&1 || exit 127
exec tailscale ip -4
