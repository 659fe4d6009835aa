// What the bench's cases share: the work dir, a clean environment for the tools, running one
// command under GNU time with the proxy's log of its requests (and, with BENCH_TRACE=1, a trace of
// them and of the link's bytes over time), the peak RSS of a process on "Verda" (started by sshd,
// so not a child of GNU time), and medians with their spread.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { countKinds, listingDepth, type Exchange, type Link, type WanProxy } from './wan-proxy.mts';

export const MiB = 1024 * 1024;
export const work = path.join(os.tmpdir(), 'comfymulti-bench');
fs.mkdirSync(work, { recursive: true });

export const has = (cmd: string) => spawnSync('sh', ['-c', 'command -v "$1"', 'sh', cmd]).status === 0;
export const version = (cmd: string, args: string[]) =>
  (spawnSync(cmd, args, { encoding: 'utf8' }).stdout || '').split('\n')[0].trim();

// Nothing of the machine's own S3 or R2 set-up leaks into a tool's run; AWS_CA_BUNDLE would make
// aws-cli fail on a plain-http loopback endpoint.
export const baseEnv: NodeJS.ProcessEnv = Object.fromEntries(
  Object.entries(process.env).filter(([k]) => !/^(AWS_|R2_|RCLONE_|NOTIFY_URL|NO_COLOR$|COMFYMULTI_)/.test(k)),
);

export interface Measure {
  seconds: number;
  /** Peak RSS of the command and its children (GNU time), MB. */
  rssMb: number;
  /** Peak RSS of its process on "Verda" (found by its command line), MB; 0 when none ran. */
  remoteRssMb: number;
  requests: number;
  kinds: Record<string, number>;
  /** Requests that carried an object body (PutObject, UploadPart). */
  bodies: number;
  /** Sequential listing round trips (see listingDepth). */
  listDepth: number;
  /** Client connections opened to the proxy. */
  connections: number;
  /** Bytes over the link, each direction (the R2 proxy's and any other carrier on the same link). */
  linkBytes: { up: number; down: number };
  stdout: string;
  error?: string;
}

let traces = 0;

const TICK = 100; // USER_HZ: /proc's CPU times are in hundredths of a second on Linux

/**
 * CPU seconds by who used them, sampled from /proc every 500 ms until stopped: this process (the
 * proxy), its descendants by what they are (the S3 server, our scripts on Mello and on Verda,
 * ssh, aws-cli, podman, ...), and everything else on the machine (other people's work).
 */
function watchCpu(): () => Record<string, number> {
  const self = process.pid;
  const seen = new Map<number, { ticks: number; who: string; comm: string }>();
  const kind = (pid: number, comm: string, parents: Map<number, number>): string => {
    let p = pid;
    for (let i = 0; i < 64 && p > 1; i++) {
      if (p === self) break;
      p = parents.get(p) ?? 0;
    }
    if (pid === self) return 'the proxy (bench process)';
    if (p !== self) return 'other work on the machine';
    let cmd = '';
    try {
      cmd = fs.readFileSync(`/proc/${pid}/cmdline`, 'latin1').replace(/\0/g, ' ');
    } catch {
      /* gone */
    }
    // Verda's side runs as the bundle Mello brought (lib/remote.ts): node .../comfymulti-verda.XXXXXXXX/verda.mjs.
    if (cmd.includes(VERDA_BUNDLE_MARKER)) return 'our code on Verda (dist/verda.mjs)';
    if (/s3-server|radosgw|ceph-osd|ceph-mon/.test(cmd)) return 'S3 server';
    if (/restore-verda|backup-mello|backup-verda/.test(cmd)) return 'our script on Mello';
    if (/\baws\b|awscli/.test(cmd)) return 'aws-cli';
    return comm;
  };
  const sample = () => {
    const parents = new Map<number, number>();
    const stats: [number, string, number][] = [];
    for (const name of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(name)) continue;
      try {
        const text = fs.readFileSync(`/proc/${name}/stat`, 'latin1');
        const close = text.lastIndexOf(')');
        const comm = text.slice(text.indexOf('(') + 1, close);
        const fields = text.slice(close + 2).split(' ');
        parents.set(Number(name), Number(fields[1]));
        stats.push([Number(name), comm, Number(fields[11]) + Number(fields[12])]);
      } catch {
        /* gone meanwhile */
      }
    }
    for (const [pid, comm, ticks] of stats) {
      const known = seen.get(pid);
      // Classified again when it exec'd something else (sh → node verda.mjs).
      const who = known?.comm === comm ? known.who : kind(pid, comm, parents);
      seen.set(pid, { ticks, who, comm });
    }
  };
  sample();
  // A process there at the start counts from then; one born later, from 0.
  const atStart = new Map([...seen].map(([pid, v]) => [pid, v.ticks]));
  const timer = setInterval(sample, 500);
  return () => {
    clearInterval(timer);
    sample();
    const by: Record<string, number> = {};
    for (const [pid, { ticks, who }] of seen) by[who] = (by[who] ?? 0) + (ticks - (atStart.get(pid) ?? 0)) / TICK;
    return by;
  };
}

/** What the command line of our code on Verda holds: the private directory it is brought into. */
export const VERDA_BUNDLE_MARKER = 'comfymulti-verda.';

/** The peak RSS (VmHWM) of the processes whose command line holds `marker`, polled until stopped. */
function watchRss(marker: string): () => number {
  let peakKb = 0;
  const poll = () => {
    for (const pid of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(pid)) continue;
      try {
        if (!fs.readFileSync(`/proc/${pid}/cmdline`, 'latin1').includes(marker)) continue;
        const hwm = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
        if (hwm) peakKb = Math.max(peakKb, Number(hwm[1]));
      } catch {
        /* gone meanwhile */
      }
    }
  };
  const timer = setInterval(poll, 200);
  return () => {
    clearInterval(timer);
    return peakKb / 1024;
  };
}

export interface MeasureOptions {
  /** Whose requests are counted (their logs are taken). */
  proxy: WanProxy;
  /** The link whose bytes are counted and, with BENCH_TRACE=1, sampled over time. */
  link: Link;
  timeoutS: number;
  /** A command line marker of the process on "Verda" whose peak RSS is reported. */
  remoteMarker?: string;
  /** For the trace's file name. */
  label: string;
}

/** Runs a command under GNU time (wall seconds, peak RSS); the requests are the proxy's log. */
export async function measure(
  cmd: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  o: MeasureOptions,
): Promise<Measure> {
  const timeFile = path.join(work, 'time.out');
  fs.rmSync(timeFile, { force: true });
  o.proxy.log.length = 0; // the log is per run; 200,000-file runs would otherwise pile it up
  const connections = o.proxy.connections;
  const bytes = { ...o.link.bytes };
  const tracing = process.env.BENCH_TRACE === '1';
  const timeline: { t: number; up: number; down: number }[] = [];
  const started = performance.now();
  const sampler = tracing
    ? setInterval(
        () =>
          timeline.push({
            t: Math.round(performance.now() - started),
            up: o.link.bytes.up - bytes.up,
            down: o.link.bytes.down - bytes.down,
          }),
        250,
      )
    : undefined;
  const remoteRss = o.remoteMarker ? watchRss(o.remoteMarker) : () => 0;
  const cpu = tracing ? watchCpu() : () => ({});
  // A process group of its own, so that a run past its time is ended whole (time, sh, node).
  const child = spawn('/usr/bin/time', ['-f', '%M', '-o', timeFile, cmd, ...args], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true,
  });
  let stderr = '';
  let stdout = '';
  child.stderr.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
  child.stdout.on('data', (d) => (stdout = (stdout + d).slice(-1_000_000)));
  const timer = setTimeout(() => process.kill(-child.pid!, 'SIGKILL'), o.timeoutS * 1000);
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  clearTimeout(timer);
  clearInterval(sampler);
  const seconds = (performance.now() - started) / 1000;
  const remoteRssMb = remoteRss();
  const cpuBy = cpu();
  const log = o.proxy.log.splice(0);
  const linkBytes = { up: o.link.bytes.up - bytes.up, down: o.link.bytes.down - bytes.down };
  // BENCH_TRACE=1: every run's exchanges (times relative to its start) to look at where time goes.
  if (tracing) {
    const rel = (t?: number) => (t === undefined ? undefined : Math.round(t - started));
    const trace = {
      label: o.label,
      profile: o.link.profile,
      cmd: [path.basename(cmd), ...args].join(' '),
      seconds,
      linkBytes,
      cpuBy,
      // restore-verda --json: its steps and their times.
      stdout: stdout.slice(-50_000),
      exchanges: log.map((e) => ({ ...e, start: rel(e.start), headers: rel(e.headers), end: rel(e.end) })),
      timeline,
    };
    const name = `trace-${String(++traces).padStart(3, '0')}-${o.label.replace(/[^\w.-]+/g, '_')}.json`;
    fs.writeFileSync(path.join(work, name), JSON.stringify(trace));
  }
  const kinds = countKinds(log) as Record<string, number>;
  const lastLine = fs.existsSync(timeFile) ? fs.readFileSync(timeFile, 'utf8').trim().split('\n').pop() : '';
  return {
    seconds,
    rssMb: Number(lastLine) / 1024 || 0,
    remoteRssMb,
    requests: log.length,
    kinds,
    bodies: (kinds.put ?? 0) + (kinds['upload-part'] ?? 0),
    listDepth: listingDepth(log as Exchange[]),
    connections: o.proxy.connections - connections,
    linkBytes,
    stdout,
    ...(code === 0
      ? {}
      : {
          error:
            `exit ${code ?? 'killed'}${seconds >= o.timeoutS ? ` after ${o.timeoutS} s` : ''}: ` +
            (stderr.trim() || stdout.trim()).split('\n').slice(-3).join(' / '),
        }),
  };
}

export const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

/** Seconds with two significant decimals under 10. */
export const f = (n: number) => (n < 10 ? n.toFixed(2) : n.toFixed(1));

/** "3.87 (3.80–3.95)": the median and the spread of the runs; one run alone is just its value. */
export function spread(xs: number[]): string {
  if (!xs.length) return 'failed';
  if (xs.length === 1) return f(xs[0]);
  return `${f(median(xs))} (${f(Math.min(...xs))}–${f(Math.max(...xs))})`;
}

/** The run whose seconds are the median (the middle one; of an even count, the lower). */
export function medianRun<T extends { seconds: number }>(runs: T[]): T {
  const s = [...runs].sort((a, b) => a.seconds - b.seconds);
  return s[Math.floor((s.length - 1) / 2)];
}

export const n = (x: number) => x.toLocaleString('en-US');
export const pct = (x: number | undefined) => (x === undefined ? '—' : x.toFixed(2));
