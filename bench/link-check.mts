// The link checked before anything is measured over it: one stream through the proxy must come
// out at the profile's rate per connection, many at once at its cap, raw TCP (TcpForward) and
// HTTP (WanProxy) alike, each direction; and the proxy's CPU while it carries them (it must not be
// what limits a run on 2 cores). The streams' two ends are another process (bench/link-load.mts),
// so this process's CPU time is the proxy's. Then one ssh connection through the raw forward
// carrying a stream on a remote command's stdin, as restore-verda relays the image to Verda: its
// rate is ssh's (its channel window over the round trip), not the proxy's, and is said as such.
//   node --import tsx bench/link-check.mts [--profile eu,far] [--quick]
// `npm run bench -- --case link` runs it too, and puts its table in the results.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from '../test/helpers.ts';
import { startSshd, type Sshd } from '../test/sshd.ts';
import { capped, Link, PROFILES, TcpForward, WanProxy, type WanProfile } from './wan-proxy.mts';

export interface LinkFigure {
  profile: WanProfile;
  path: Carrier;
  dir: 'down' | 'up';
  streams: number;
  /** What the profile says it should carry, bytes a second (Infinity: unpaced); for ssh, what the link would let it. */
  expected: number;
  /** What it carried: all the streams' bytes over the time from the first byte to the last. */
  measured: number;
  /** The slowest and fastest single stream, bytes a second. */
  single: [number, number];
  /** The proxy's CPU time over the wall time: 1.0 is one core. */
  cpu: number;
}

type Carrier = 'tcp' | 'http' | 'ssh';
interface Check {
  path: Carrier;
  dir: 'down' | 'up';
  streams: number;
}
const LOAD = path.join(ROOT, 'bench/link-load.mts');

/**
 * One ssh connection through `port` (a forward to the sshd) carrying `bytes` on a remote command's
 * stdin; the remote side times it from its first byte to its last. Returns bytes a second.
 */
async function sshStream(sshd: Sshd, port: number, bytes: number): Promise<number> {
  const config = path.join(sshd.dir, `ssh_config-check-${port}`);
  const hostKey = fs.readFileSync(path.join(sshd.dir, 'host_key.pub'), 'utf8').trim().split(' ').slice(0, 2).join(' ');
  fs.writeFileSync(path.join(sshd.dir, 'known_hosts_check'), `verda-check ${hostKey}\n`);
  fs.writeFileSync(
    config,
    [
      'Host verda',
      '  HostName 127.0.0.1',
      `  Port ${port}`,
      `  User ${process.env.USER || 'root'}`,
      `  IdentityFile ${sshd.dir}/user_key`,
      '  IdentitiesOnly yes',
      '  HostKeyAlias verda-check',
      `  UserKnownHostsFile ${sshd.dir}/known_hosts_check`,
      '  StrictHostKeyChecking yes',
      '  LogLevel ERROR',
      '',
    ].join('\n'),
  );
  const remote = 'head -c 1 >/dev/null; a=$(date +%s%N); cat >/dev/null; b=$(date +%s%N); echo $a $b';
  const child = spawn(
    'sh',
    ['-c', 'head -c "$1" /dev/zero | ssh -F "$2" verda "$3"', 'sh', String(bytes), config, remote],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  const code = await new Promise((r) => child.on('close', r));
  if (code !== 0) throw new Error(`ssh stream: exit ${code}`);
  const [a, b] = out.trim().split(' ').map(Number);
  return (bytes - 1) / ((b - a) / 1e9);
}

function node(args: string[]): { out: Promise<string>; kill: () => void } {
  const child = spawn(process.execPath, ['--import', 'tsx', LOAD, ...args], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  let text = '';
  const out = new Promise<string>((resolve, reject) => {
    child.stdout.on('data', (d) => {
      text += d;
      if (text.endsWith('\n')) resolve(text);
    });
    child.on('exit', (code) =>
      code ? reject(new Error(`link-load ${args.join(' ')} exited ${code}`)) : resolve(text),
    );
  });
  return { out, kill: () => child.kill('SIGTERM') };
}

/** Every check of the profiles, in order; `seconds`: about how long each transfer lasts. */
export async function checkLink(
  profiles: WanProfile[],
  seconds = 4,
  only: (c: Check) => boolean = () => true,
): Promise<LinkFigure[]> {
  const server = node(['serve']);
  const ports = JSON.parse(await server.out) as { tcp: number; http: number };
  const sshd = await startSshd(['verda']);
  const figures: LinkFigure[] = [];
  try {
    for (const profile of profiles) {
      const rate = profile.bytesPerSecond;
      const cap = profile.capBytesPerSecond;
      // Unpaced (loopback): what the proxy itself can carry, 1 GB a check.
      const cases: Check[] = capped(profile)
        ? [
            { path: 'tcp', dir: 'down', streams: 1 },
            { path: 'tcp', dir: 'down', streams: 16 },
            { path: 'tcp', dir: 'up', streams: 16 },
            { path: 'http', dir: 'down', streams: 1 },
            { path: 'http', dir: 'down', streams: 16 },
            { path: 'http', dir: 'up', streams: 16 },
            { path: 'ssh', dir: 'up', streams: 1 },
          ]
        : [
            { path: 'tcp', dir: 'down', streams: 4 },
            { path: 'http', dir: 'down', streams: 4 },
            { path: 'http', dir: 'up', streams: 4 },
            { path: 'ssh', dir: 'up', streams: 1 },
          ];
      for (const c of cases.filter(only)) {
        if (c.path === 'ssh') {
          const expected = Math.min(rate, cap);
          const bytes = Number.isFinite(expected) ? Math.round(expected * seconds) : 512e6;
          // As in the morning: what Mello sends Verda draws on the way towards the machines.
          const link = new Link(profile);
          const fwd = await TcpForward.start({ host: '127.0.0.1', port: sshd.port }, link, 'down');
          try {
            const cpu = process.cpuUsage();
            const t = performance.now();
            const measured = await sshStream(sshd, fwd.port, bytes);
            const used = process.cpuUsage(cpu);
            // Over the whole connection (set-up included): the proxy's share of a core is a lower bound.
            const cpuShare = (used.user + used.system) / 1e6 / ((performance.now() - t) / 1000);
            figures.push({ profile, ...c, expected, measured, single: [measured, measured], cpu: cpuShare });
          } finally {
            await fwd.close();
          }
          continue;
        }
        const expected = Math.min(c.streams * rate, cap);
        const bytes = Number.isFinite(expected) ? Math.round((expected * seconds) / c.streams) : 256e6;
        const link = new Link(profile);
        const carrier =
          c.path === 'tcp'
            ? await TcpForward.start({ host: '127.0.0.1', port: ports.tcp }, link)
            : await WanProxy.start(`http://127.0.0.1:${ports.http}`, link);
        const port = carrier instanceof TcpForward ? carrier.port : Number(new URL(carrier.endpoint).port);
        try {
          const cpu = process.cpuUsage();
          const r = JSON.parse(
            await node(['load', c.path, c.dir, String(port), String(c.streams), String(bytes)]).out,
          ) as { bytes: number; seconds: number; single: number[] };
          const used = process.cpuUsage(cpu);
          figures.push({
            profile,
            ...c,
            expected,
            measured: r.bytes / r.seconds,
            single: [Math.min(...r.single), Math.max(...r.single)],
            // Over the seconds bytes moved (the load process starts meanwhile, the proxy idle).
            cpu: (used.user + used.system) / 1e6 / r.seconds,
          });
        } finally {
          await carrier.close();
        }
      }
    }
  } finally {
    server.kill();
    await sshd.stop();
  }
  return figures;
}

const CARRIERS: Record<Carrier, string> = {
  tcp: 'raw TCP',
  http: 'HTTP',
  ssh: "one ssh connection (a command's stdin, Mello → Verda)",
};

const mb = (x: number) => (Number.isFinite(x) ? (x / 1e6).toFixed(1) : 'unpaced');

export function linkTable(figures: LinkFigure[]): string {
  return [
    '| profile | carrier | direction | streams | expected MB/s | measured MB/s | measured / expected | ' +
      'one stream MB/s (slowest–fastest) | proxy CPU (1 = a core) |',
    '|---|---|---|---:|---:|---:|---:|---|---:|',
    ...figures.map(
      (f) =>
        `| ${f.profile.name} | ${CARRIERS[f.path]} | ${f.dir === 'down' ? 'to the client' : 'to the server'} ` +
        `| ${f.streams} | ${mb(f.expected)} | ${mb(f.measured)} | ` +
        `${Number.isFinite(f.expected) ? (f.measured / f.expected).toFixed(3) : '—'} | ` +
        `${mb(f.single[0])}–${mb(f.single[1])} | ${f.cpu.toFixed(2)} |`,
    ),
  ].join('\n');
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { default: minimist } = await import('minimist');
  const argv = minimist(process.argv.slice(2), { string: ['profile'], boolean: ['quick'] });
  const ids = argv.profile ? String(argv.profile).split(',') : ['loopback', 'eu', 'far'];
  const figures = await checkLink(
    ids.map((id) => PROFILES[id]),
    argv.quick ? 1.5 : 4,
  );
  console.log(linkTable(figures));
}
