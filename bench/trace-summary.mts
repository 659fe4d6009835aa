// `node --import tsx bench/trace-summary.mts [FILE|PATTERN...]`: where a run's time went, from the
// traces `BENCH_TRACE=1 npm run bench` writes to the work dir (trace-NNN-LABEL.json; a pattern
// matches labels, e.g. `far-models-ours`). For each: the seconds and the line fraction; restore-
// verda's steps; the requests by kind, the connections, the ranges' sizes; how many GETs were in
// flight (time-weighted) and the gaps with none; each object from its first request to its last
// byte; and the link's bytes a second over the run.
import fs from 'node:fs';
import path from 'node:path';
import { work } from './common.mts';
import type { Exchange, WanProfile } from './wan-proxy.mts';

// As the proxy logs it (bench/wan-proxy.mts), read back from the trace's JSON.
type TraceExchange = Exchange;
interface Trace {
  label: string;
  profile: WanProfile;
  cmd: string;
  seconds: number;
  linkBytes: { up: number; down: number };
  cpuBy?: Record<string, number>;
  stdout?: string;
  exchanges: TraceExchange[];
  timeline: { t: number; up: number; down: number }[];
}

const MB = 1e6;
const s = (ms: number) => (ms / 1000).toFixed(2);

/** Time-weighted mean and the max of the intervals open at once, and the gaps with none open. */
function overlap(iv: [number, number][], from: number, to: number) {
  const ev = iv.flatMap(([a, b]) => [
    [a, 1],
    [b, -1],
  ]) as [number, number][];
  ev.sort((x, y) => x[0] - y[0] || x[1] - y[1]);
  let open = 0;
  let last = from;
  let area = 0;
  let max = 0;
  const gaps: [number, number][] = [];
  for (const [t, d] of ev) {
    if (open === 0 && t > last) gaps.push([last, t]);
    area += open * (t - last);
    open += d;
    max = Math.max(max, open);
    last = t;
  }
  if (last < to) gaps.push([last, to]);
  return { mean: area / Math.max(1, to - from), max, gaps };
}

export function summarize(t: Trace): string {
  const out: string[] = [];
  const total = t.seconds * 1000;
  const cap = t.profile.capBytesPerSecond;
  const moved = t.linkBytes.down + t.linkBytes.up;
  out.push(
    `## ${t.label}: ${t.cmd}`,
    `${t.seconds.toFixed(2)} s; link ${(t.linkBytes.down / MB).toFixed(1)} MB down, ${(t.linkBytes.up / MB).toFixed(1)} MB up` +
      (Number.isFinite(cap) ? `; line (both ways) ${(moved / (t.seconds * cap)).toFixed(2)}` : ''),
  );
  if (t.cpuBy && Object.keys(t.cpuBy).length) {
    const by = Object.entries(t.cpuBy)
      .filter(([, v]) => v >= 0.05)
      .sort((a, b) => b[1] - a[1]);
    const all = by.reduce((a, [, v]) => a + v, 0);
    out.push(
      `CPU seconds (${(all / t.seconds).toFixed(2)} cores of 2 on average): ` +
        by.map(([k, v]) => `${k} ${v.toFixed(1)}`).join(', '),
    );
  }
  if (t.stdout?.includes('"steps"')) {
    try {
      const json = JSON.parse(t.stdout.slice(t.stdout.indexOf('\n{') + 1));
      out.push('steps:');
      for (const st of json.steps)
        out.push(
          `  ${(st.ms / 1000).toFixed(2).padStart(7)} s  ${st.status.padEnd(7)} ${st.name}: ${st.summary ?? st.error ?? ''}`,
        );
    } catch {
      /* not restore-verda's JSON */
    }
  }
  const ex = t.exchanges.filter((e) => e.start !== undefined);
  const kinds = new Map<string, number>();
  for (const e of ex) kinds.set(e.kind, (kinds.get(e.kind) ?? 0) + 1);
  const conns = new Set(ex.map((e) => e.conn)).size;
  out.push(`requests: ${[...kinds].map(([k, c]) => `${c} ${k}`).join(', ')}; ${conns} connections`);
  const gets = ex.filter((e) => e.kind === 'get');
  if (gets.length) {
    const sizes = gets.map((e) => e.bytesDown).sort((a, b) => a - b);
    out.push(
      `GET bodies: ${gets.length}, ${(sizes[0] / MB).toFixed(1)} to ${(sizes[sizes.length - 1] / MB).toFixed(1)} MB ` +
        `(median ${(sizes[sizes.length >> 1] / MB).toFixed(1)}); ranged: ${gets.filter((e) => e.range).length}`,
    );
    const first = Math.min(...gets.map((e) => e.start));
    const last = Math.max(...gets.map((e) => e.end ?? total));
    const o = overlap(
      gets.map((e) => [e.start, e.end ?? total]),
      first,
      last,
    );
    const bodyMs = gets.map((e) => (e.end ?? total) - (e.headers ?? e.start));
    const perGet = gets.map((e, i) => e.bytesDown / Math.max(1, bodyMs[i]) / 1000);
    out.push(
      `GETs from ${s(first)} s to ${s(last)} s: in flight ${o.mean.toFixed(1)} on average, ${o.max} at most; ` +
        `each body at ${Math.min(...perGet).toFixed(1)} to ${Math.max(...perGet).toFixed(1)} MB/s ` +
        `(per connection: ${(t.profile.bytesPerSecond / MB).toFixed(0)})`,
    );
    const gaps = o.gaps.filter(([a, b]) => b - a >= 20).sort((x, y) => y[1] - y[0] - (x[1] - x[0]));
    if (gaps.length)
      out.push(
        `no GET in flight for ${s(gaps.reduce((a, [x, y]) => a + y - x, 0))} s in ${gaps.length} gaps of 20 ms or more; longest: ` +
          gaps
            .slice(0, 5)
            .map(([a, b]) => `${s(a)}–${s(b)}`)
            .join(', '),
      );
  }
  // Each object: from its first request to its last byte.
  const byKey = new Map<string, TraceExchange[]>();
  for (const e of ex.filter((x) => x.kind === 'get' || x.kind === 'put' || x.kind === 'upload-part'))
    byKey.set(e.path, [...(byKey.get(e.path) ?? []), e]);
  if (byKey.size && byKey.size <= 40) {
    out.push('objects (first request → last byte, MB, MB/s over that time, requests):');
    for (const [key, es] of [...byKey].sort(
      (a, b) => Math.min(...a[1].map((e) => e.start)) - Math.min(...b[1].map((e) => e.start)),
    )) {
      const a = Math.min(...es.map((e) => e.start));
      const b = Math.max(...es.map((e) => e.end ?? total));
      const bytes = es.reduce((n, e) => n + e.bytesDown + e.bytesUp, 0);
      out.push(
        `  ${s(a).padStart(7)} → ${s(b).padStart(7)}  ${(bytes / MB).toFixed(1).padStart(8)}  ` +
          `${(bytes / MB / ((b - a) / 1000)).toFixed(1).padStart(6)}  ${String(es.length).padStart(3)}  ${key}`,
      );
    }
  }
  if (t.timeline.length) {
    const perSecond: string[] = [];
    let prev = { t: 0, up: 0, down: 0 };
    for (const p of t.timeline.filter((_, i) => i % 4 === 3)) {
      perSecond.push(`${((p.down - prev.down + p.up - prev.up) / MB / ((p.t - prev.t) / 1000)).toFixed(0)}`);
      prev = p;
    }
    out.push(`link MB/s, both ways, second by second: ${perSecond.join(' ')}`);
  }
  return out.join('\n');
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const args = process.argv.slice(2);
  const all = fs
    .readdirSync(work)
    .filter((n) => /^trace-\d+-.*\.json$/.test(n))
    .sort();
  const files = args.length
    ? args.flatMap((a) => (fs.existsSync(a) ? [a] : all.filter((n) => n.includes(a)).map((n) => path.join(work, n))))
    : all.map((n) => path.join(work, n));
  for (const file of files) console.log(summarize(JSON.parse(fs.readFileSync(file, 'utf8')) as Trace) + '\n');
}
