// `npm run bench`: our sync (backup-mello.mts) against the tools an admin would otherwise use
// (`rclone copy --checksum`, `aws s3 sync`), on the same data, against the same S3 server, in
// one run, on three network profiles (loopback, EU, far: bench/wan-proxy.mts says what they
// model). Each tool has its own bucket per profile and case, so its unchanged rerun is the second
// run of that same tool. Requests are counted at the proxy, for every tool. Prints a markdown
// table with the ratio ours / best peer against issue 13's goals and writes it to
// bench/results.md (a full run) or to the work dir (a subset). Not a test: `npm test` does not
// run it. `npm run bench -- --help` for the options.
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import minimist from 'minimist';
import { ROOT, writeRandomFile } from '../test/helpers.ts';
import { loadServer, type RunningServer } from './servers.mts';
import { countKinds, describeProfile, listingDepth, PROFILES, WanProxy, type WanProfile } from './wan-proxy.mts';

const USAGE = `Usage: npm run bench -- [--quick] [--profile P,...] [--case C,...] [--server S]

  --profile   loopback, eu, far (default: all three)
  --case      big (400 MB in 4 files), small (2,000 files), huge (200,000 files, loopback only),
              startup (--help of a script), verda (backup-verda --quick over sshd); default: all
  --quick     smaller data (a harness check in a minute or two; ratios mean little)
  --server    s3rver (default), rgw (Ceph RGW), or a module exporting benchServer (bench/servers.mts)
A full run writes bench/results.md; a subset or --quick writes results.md in the work dir.`;

const argv = minimist(process.argv.slice(2), {
  boolean: ['quick', 'help'],
  string: ['profile', 'case', 'server'],
  alias: { h: 'help' },
  unknown: (a) => {
    if (!a.startsWith('-')) return true;
    console.error(`unknown option ${a}\n${USAGE}`);
    process.exit(2);
  },
});
if (argv.help) {
  console.log(USAGE);
  process.exit(0);
}
const quick = Boolean(argv.quick);
const MiB = 1024 * 1024;

type CaseId = 'big' | 'small' | 'huge' | 'startup' | 'verda';
const ALL_CASES: CaseId[] = ['big', 'small', 'huge', 'startup', 'verda'];
const pick = <T extends string>(value: string | undefined, all: readonly T[], what: string): T[] => {
  if (!value) return [...all];
  const picked = value.split(',').map((s) => s.trim().toLowerCase());
  for (const p of picked) {
    if (!all.includes(p as T)) {
      console.error(`unknown ${what} ${p}: one of ${all.join(', ')}`);
      process.exit(2);
    }
  }
  return picked as T[];
};
const profileIds = pick(argv.profile, Object.keys(PROFILES), 'profile');
const caseIds = pick<CaseId>(argv.case, ALL_CASES, 'case');
const subset = Boolean(argv.profile || argv.case || argv.server || quick);

interface DataCase {
  id: 'big' | 'small' | 'huge';
  title: string;
  files: number;
  size: number;
  /** Files spread over this many outputs/userNNN/ directories. */
  users: number;
  /** The 200,000-key case runs on loopback only: over WAN it would take hours of s3rver. */
  loopbackOnly?: boolean;
  /** Peak RSS goal for ours, MB. */
  rssGoalMb?: number;
}
const DATA: DataCase[] = [
  quick
    ? { id: 'big', title: '128 MiB in 4 files', files: 4, size: 32 * MiB, users: 4 }
    : { id: 'big', title: '400 MB in 4 files', files: 4, size: 100e6, users: 4 },
  { id: 'small', title: `${quick ? 200 : '2,000'} small files`, files: quick ? 200 : 2000, size: 4096, users: 20 },
  quick
    ? { id: 'huge', title: '5,000 small files', files: 5000, size: 1024, users: 50, loopbackOnly: true, rssGoalMb: 256 }
    : {
        id: 'huge',
        title: '200,000 small files',
        files: 200_000,
        size: 1024,
        users: 200,
        loopbackOnly: true,
        rssGoalMb: 256,
      },
];
const dataCases = DATA.filter((d) => caseIds.includes(d.id));
const TOOLS = ['ours', 'rclone', 'aws'] as const;
type Tool = (typeof TOOLS)[number];

const work = path.join(os.tmpdir(), 'comfymulti-bench');
fs.mkdirSync(work, { recursive: true });
const has = (cmd: string) => spawnSync('sh', ['-c', 'command -v "$1"', 'sh', cmd]).status === 0;
const benchStarted = performance.now();
// Other work on the machine skews the seconds (less so the ratios): the report gives the load.
const loadAtStart = os.loadavg()[0];

// --- tools ------------------------------------------------------------------------------------
const missing = [
  ...(has('rclone') ? [] : ['rclone']),
  ...(has('aws') ? [] : ['awscli']),
  ...(fs.existsSync('/usr/bin/time') ? [] : ['time']),
  ...(has('hyperfine') ? [] : ['hyperfine']),
];
if (missing.length) {
  console.log(`installing from Debian: ${missing.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  spawnSync('apt-get', ['update', '-qq'], { stdio: 'inherit', env });
  const r = spawnSync('apt-get', ['install', '-y', '-qq', ...missing], { stdio: 'inherit', env });
  // hyperfine is a nicety (start-up falls back to repeated runs); the others are not.
  if (r.status !== 0 && missing.some((m) => m !== 'hyperfine'))
    throw new Error(`apt-get install ${missing.join(' ')} failed`);
}
const version = (cmd: string, args: string[]) =>
  (spawnSync(cmd, args, { encoding: 'utf8' }).stdout || '').split('\n')[0].trim();
// The bundle is what `npm ci` leaves and what the admin runs; without it we would time tsx.
if (spawnSync(process.execPath, ['build.mjs'], { cwd: ROOT, stdio: 'inherit' }).status !== 0)
  throw new Error('build failed');

// Nothing of the machine's own S3 or R2 set-up leaks into a tool's run; AWS_CA_BUNDLE would make
// aws-cli fail on a plain-http loopback endpoint.
const baseEnv: NodeJS.ProcessEnv = Object.fromEntries(
  Object.entries(process.env).filter(([k]) => !/^(AWS_|R2_|RCLONE_|NOTIFY_URL|NO_COLOR$)/.test(k)),
);

// --- data -------------------------------------------------------------------------------------
function dataRoot(d: DataCase): string {
  const root = path.join(work, `${d.id}-${d.files}x${d.size}`);
  const done = path.join(root, '.complete');
  if (fs.existsSync(done)) return root;
  console.log(`making ${d.title} in ${root}…`);
  fs.rmSync(root, { recursive: true, force: true });
  const dirs = new Set<string>();
  for (let i = 0; i < d.files; i++) {
    const dir = path.join(root, 'outputs', `user${String(i % d.users).padStart(3, '0')}`);
    const file = path.join(dir, `img_${String(i).padStart(6, '0')}.bin`);
    if (d.size > MiB) writeRandomFile(file, d.size);
    else {
      if (!dirs.has(dir)) fs.mkdirSync(dir, { recursive: true });
      dirs.add(dir);
      fs.writeFileSync(file, crypto.randomBytes(d.size));
    }
  }
  fs.writeFileSync(done, '');
  return root;
}

// --- measuring one run of one tool -------------------------------------------------------------
interface Measure {
  seconds: number;
  rssMb: number;
  requests: number;
  kinds: Record<string, number>;
  /** Requests that carried an object body (PutObject, UploadPart). */
  bodies: number;
  /** Sequential listing round trips (see listingDepth). */
  listDepth: number;
  error?: string;
}

let traces = 0;
/** Runs a command under GNU time (wall seconds, peak RSS); the requests are the proxy's log. */
async function measure(
  proxy: WanProxy,
  cmd: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  timeoutS: number,
): Promise<Measure> {
  const timeFile = path.join(work, 'time.out');
  proxy.log.length = 0; // the log is per run; 200,000-file runs would otherwise pile it up
  const started = performance.now();
  // A process group of its own, so that a run past its time is ended whole (time, sh, node).
  const child = spawn('/usr/bin/time', ['-f', '%M', '-o', timeFile, cmd, ...args], {
    env,
    stdio: ['ignore', 'ignore', 'pipe'],
    detached: true,
  });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
  const timer = setTimeout(() => process.kill(-child.pid!, 'SIGKILL'), timeoutS * 1000);
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  clearTimeout(timer);
  const seconds = (performance.now() - started) / 1000;
  const log = proxy.log.splice(0);
  // BENCH_TRACE=1: every run's exchanges (times relative to its start) to look at where time goes.
  if (process.env.BENCH_TRACE === '1') {
    const trace = log.map((e) => ({
      ...e,
      start: Math.round(e.start - started),
      end: e.end && Math.round(e.end - started),
    }));
    fs.writeFileSync(path.join(work, `trace-${++traces}-${path.basename(cmd)}.json`), JSON.stringify(trace, null, 1));
  }
  const kinds = countKinds(log) as Record<string, number>;
  const lastLine = fs.existsSync(timeFile) ? fs.readFileSync(timeFile, 'utf8').trim().split('\n').pop() : '';
  return {
    seconds,
    rssMb: Number(lastLine) / 1024,
    requests: log.length,
    kinds,
    bodies: (kinds.put ?? 0) + (kinds['upload-part'] ?? 0),
    listDepth: listingDepth(log),
    ...(code === 0
      ? {}
      : {
          error:
            `exit ${code ?? 'killed'}${seconds >= timeoutS ? ` after ${timeoutS} s` : ''}: ` +
            stderr.trim().split('\n').slice(-3).join(' / '),
        }),
  };
}

function runTool(
  tool: Tool,
  proxy: WanProxy,
  srv: RunningServer,
  root: string,
  bucket: string,
  state: string,
  timeoutS: number,
) {
  const { accessKeyId, secretAccessKey } = srv.keys;
  const endpoint = proxy.endpoint;
  if (tool === 'ours')
    return measure(
      proxy,
      path.join(ROOT, 'backup-mello.mts'),
      [],
      {
        ...baseEnv,
        R2_ENDPOINT: endpoint,
        R2_ACCESS_KEY_ID: accessKeyId,
        R2_SECRET_ACCESS_KEY: secretAccessKey,
        R2_USER_FILES_BUCKET: bucket,
        MELLO_DATA_DIR: root,
        COMFYMULTI_STATE_DIR: state,
      },
      timeoutS,
    );
  if (tool === 'rclone')
    return measure(
      proxy,
      'rclone',
      ['copy', '--checksum', path.join(root, 'outputs'), `bench:${bucket}/outputs`],
      {
        ...baseEnv,
        RCLONE_CONFIG_BENCH_TYPE: 's3',
        RCLONE_CONFIG_BENCH_PROVIDER: 'Other',
        RCLONE_CONFIG_BENCH_ENDPOINT: endpoint,
        RCLONE_CONFIG_BENCH_ACCESS_KEY_ID: accessKeyId,
        RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY: secretAccessKey,
        RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE: 'true',
        RCLONE_CONFIG_BENCH_REGION: 'auto',
      },
      timeoutS,
    );
  return measure(
    proxy,
    'aws',
    [
      's3',
      'sync',
      path.join(root, 'outputs'),
      `s3://${bucket}/outputs`,
      '--endpoint-url',
      endpoint,
      '--only-show-errors',
    ],
    {
      ...baseEnv,
      AWS_ACCESS_KEY_ID: accessKeyId,
      AWS_SECRET_ACCESS_KEY: secretAccessKey,
      AWS_DEFAULT_REGION: 'us-east-1',
      AWS_PAGER: '',
    },
    timeoutS,
  );
}

// --- goals (issue 13) ---------------------------------------------------------------------------
interface Row {
  profile: WanProfile;
  data: DataCase;
  phase: 'first upload' | 'unchanged rerun';
  m: Record<Tool, Measure>;
}

/** Ours / the faster peer; undefined when ours or both peers failed. */
function ratioOf(r: Row): number | undefined {
  const peers = [r.m.rclone, r.m.aws].filter((m) => !m.error);
  return r.m.ours.error || !peers.length ? undefined : r.m.ours.seconds / Math.min(...peers.map((m) => m.seconds));
}

/** The row's goals, each with whether ours met it. */
function goals(r: Row): { text: string; met: boolean | undefined; miss: string }[] {
  const ours = r.m.ours;
  const ratio = ratioOf(r);
  const rerun = r.phase === 'unchanged rerun';
  const limit = rerun ? 0.5 : 0.7;
  const out = [
    { text: `≤ ${limit}`, met: ratio === undefined ? undefined : ratio <= limit, miss: `ratio ${ratio?.toFixed(2)}` },
  ];
  if (r.data.rssGoalMb)
    out.push({
      text: `RSS < ${r.data.rssGoalMb} MB`,
      met: ours.rssMb < r.data.rssGoalMb,
      miss: `RSS ${Math.round(ours.rssMb)} MB`,
    });
  if (rerun && r.data.id === 'huge') {
    const perK = ((ours.kinds.list ?? 0) / r.data.files) * 1000;
    out.push({ text: 'no body', met: ours.bodies === 0, miss: `${ours.bodies} bodies` });
    out.push({ text: '≤ 1 list / 1,000 keys', met: perK <= 1, miss: `${perK.toFixed(2)} list / 1,000 keys` });
  }
  if (rerun && r.profile.rttMs > 0) {
    // One round trip of listing per 1,000 users' directories, not per 1,000 keys.
    const most = Math.ceil(r.data.users / 1000);
    out.push({
      text: `listing ${most} round trip`,
      met: ours.listDepth <= most,
      miss: `listing ${ours.listDepth} round trips`,
    });
  }
  return out;
}

// --- the runs -----------------------------------------------------------------------------------
const rows: Row[] = [];
const caseSeconds = new Map<string, number>();
const serverKind = await loadServer(argv.server || 's3rver');
const runsOn = (p: string) => dataCases.filter((d) => !d.loopbackOnly || p === 'loopback');
if (profileIds.some((p) => runsOn(p).length)) {
  const roots = new Map(dataCases.map((d) => [d.id, dataRoot(d)]));
  console.log(`S3 server: ${serverKind.describe}`);
  const srv = await serverKind.start();
  const admin = new S3Client({
    endpoint: srv.endpoint,
    region: 'auto',
    forcePathStyle: true,
    credentials: srv.keys,
  });
  try {
    for (const p of profileIds) {
      const profile = PROFILES[p];
      const proxy = await WanProxy.start(srv.endpoint, profile);
      try {
        for (const d of runsOn(p)) {
          const caseStarted = performance.now();
          const state = fs.mkdtempSync(path.join(work, 'state-'));
          const first = { profile, data: d, phase: 'first upload', m: {} } as Row;
          const rerun = { profile, data: d, phase: 'unchanged rerun', m: {} } as Row;
          // Generous, but a run always ends: 200,000 files through s3rver take minutes per tool.
          const timeoutS = d.id === 'huge' ? 3600 : 1800;
          for (const tool of TOOLS) {
            const bucket = `${p}-${d.id}-${tool}-${Date.now().toString(36)}`;
            await admin.send(new CreateBucketCommand({ Bucket: bucket }));
            for (const [row, what] of [
              [first, 'first upload'],
              [rerun, 'rerun'],
            ] as const) {
              process.stdout.write(`${profile.name}, ${d.title}: ${tool} ${what}… `);
              row.m[tool] = await runTool(tool, proxy, srv, roots.get(d.id)!, bucket, state, timeoutS);
              const m = row.m[tool];
              console.log(
                m.error
                  ? `FAILED ${m.error}`
                  : `${m.seconds.toFixed(2)} s, ${m.requests} requests, ${Math.round(m.rssMb)} MB`,
              );
            }
          }
          rows.push(first, rerun);
          fs.rmSync(state, { recursive: true, force: true });
          caseSeconds.set(`${profile.name}, ${d.title}`, (performance.now() - caseStarted) / 1000);
        }
      } finally {
        await proxy.close();
      }
    }
  } finally {
    admin.destroy();
    await srv.stop();
  }
}

// --- start-up: --help -----------------------------------------------------------------------------
let startup: { seconds: number; how: string } | undefined;
if (caseIds.includes('startup')) {
  const script = path.join(ROOT, 'backup-mello.mts');
  const json = path.join(work, 'hyperfine.json');
  if (has('hyperfine')) {
    const r = spawnSync(
      'hyperfine',
      ['-N', '--warmup', '3', '--runs', '30', '--export-json', json, `${script} --help`],
      {
        env: baseEnv,
        stdio: ['ignore', 'ignore', 'inherit'],
      },
    );
    if (r.status !== 0) throw new Error('hyperfine failed');
    const res = JSON.parse(fs.readFileSync(json, 'utf8')).results[0] as {
      mean: number;
      stddev: number;
      median: number;
    };
    startup = {
      seconds: res.mean,
      how:
        `hyperfine, 30 runs: mean ${res.mean.toFixed(3)} s ± ${res.stddev.toFixed(3)}, ` +
        `median ${res.median.toFixed(3)} s`,
    };
  } else {
    const times: number[] = [];
    for (let i = 0; i < 23; i++) {
      const t = performance.now();
      spawnSync(script, ['--help'], { env: baseEnv, stdio: 'ignore' });
      if (i >= 3) times.push((performance.now() - t) / 1000);
    }
    times.sort((a, b) => a - b);
    startup = { seconds: times[10], how: `20 runs after 3 warm-up: median ${times[10].toFixed(3)} s` };
  }
  console.log(`start-up, backup-mello.mts --help: ${startup.how}`);
}

// --- backup-verda --quick against the fixture over a real sshd ----------------------------------
let verda: string | undefined;
if (caseIds.includes('verda')) {
  console.log('backup-verda --quick against the fixture over a real sshd…');
  const { startSshd } = await import('../test/sshd.ts');
  const { makeVerda } = await import('../test/verda-fixture.ts');
  const sshd = await startSshd(['verda']);
  const fixtureRoot = fs.mkdtempSync(path.join(work, 'verda-'));
  const fixture = makeVerda(path.join(fixtureRoot, 'verda'));
  const srv = await serverKind.start();
  const admin = new S3Client({ endpoint: srv.endpoint, region: 'auto', forcePathStyle: true, credentials: srv.keys });
  const runs: string[] = [];
  try {
    for (const b of ['comfy-multi-cache', 'comfy-multi-model-vault-backup'])
      await admin.send(new CreateBucketCommand({ Bucket: b }));
    const env = {
      ...baseEnv,
      ...fixture.env,
      R2_ENDPOINT: srv.endpoint,
      R2_ACCESS_KEY_ID: srv.keys.accessKeyId,
      R2_SECRET_ACCESS_KEY: srv.keys.secretAccessKey,
      VERDA_HOST: 'verda',
      SSH_CONFIG: sshd.config,
      BACKUP_DIR: path.join(fixtureRoot, 'backups'),
      COMFYMULTI_STATE_DIR: path.join(fixtureRoot, 'state'),
    };
    for (let i = 0; i < 3; i++) {
      const before = sshd.connections();
      const started = performance.now();
      const r = spawnSync(path.join(ROOT, 'backup-verda.mts'), ['--quick'], { env, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`backup-verda --quick: ${r.stdout}${r.stderr}`);
      const n = sshd.connections() - before;
      runs.push(`${((performance.now() - started) / 1000).toFixed(2)} s, ${n} SSH connection${n === 1 ? '' : 's'}`);
      await new Promise((r) => setTimeout(r, 1000)); // a new timestamp
    }
    verda =
      `backup-verda.mts --quick against the fixture over a real sshd (loopback, no proxy): ${runs.join('; ')} ` +
      '(three runs; the bash original opened 25 connections).';
  } finally {
    admin.destroy();
    await srv.stop();
    await sshd.stop();
    fs.rmSync(fixtureRoot, { recursive: true, force: true });
  }
}

// --- report -----------------------------------------------------------------------------------
const f = (n: number) => (n < 10 ? n.toFixed(2) : n.toFixed(1));
const secs = (m: Measure) => (m.error ? 'failed' : f(m.seconds));
const n = (x: number) => x.toLocaleString('en-US');
const totalSeconds = (performance.now() - benchStarted) / 1000;
const lines = [
  `Measured ${new Date().toISOString().slice(0, 10)} on ${os.cpus().length} × ${os.cpus()[0]?.model.trim()}, ` +
    `${Math.round(os.totalmem() / 2 ** 30)} GiB, ${os.type()} ${os.release()}, Node ${process.version}; ` +
    `${version('rclone', ['version'])}; ${version('aws', ['--version'])}. S3 server: ${serverKind.describe}, ` +
    `behind the WAN proxy (bench/wan-proxy.mts) for every tool. Profiles: ` +
    `${profileIds.map((p) => describeProfile(PROFILES[p])).join('; ')}.${quick ? ' --quick sizes.' : ''}`,
  '',
  '| profile | case | ours s | rclone s | aws s | ours / best | goal | met | ' +
    'requests ours / rclone / aws | peak RSS MB ours / rclone / aws |',
  '|---|---|---:|---:|---:|---:|---|---|---|---|',
  ...rows.map((r) => {
    const g = goals(r);
    const ratio = ratioOf(r)?.toFixed(2) ?? '—';
    const met = g.some((x) => x.met === undefined)
      ? '?'
      : g.every((x) => x.met)
        ? '✓'
        : `✗ ${g
            .filter((x) => !x.met)
            .map((x) => x.miss)
            .join(', ')}`;
    return (
      `| ${r.profile.name} | ${r.data.title}, ${r.phase} | ` +
      `${secs(r.m.ours)} | ${secs(r.m.rclone)} | ${secs(r.m.aws)} | ${ratio} | ` +
      `${g.map((x) => x.text).join(', ')} | ${met} | ${TOOLS.map((t) => n(r.m[t].requests)).join(' / ')} | ` +
      `${TOOLS.map((t) => Math.round(r.m[t].rssMb)).join(' / ')} |`
    );
  }),
  ...(startup
    ? [
        `| — | backup-mello.mts --help, start-up | ${startup.seconds.toFixed(3)} | | | | < 0.1 s | ` +
          `${startup.seconds < 0.1 ? '✓' : '✗'} | | |`,
      ]
    : []),
  '',
  'Requests by kind (list: ListObjectsV2; depth: listing round trips one after the other):',
  '',
  ...rows.map((r) => {
    const tools = TOOLS.map((t) => {
      const m = r.m[t];
      const kinds =
        Object.entries(m.kinds)
          .sort((a, b) => b[1] - a[1])
          .map(([k, c]) => `${n(c)} ${k}`)
          .join(', ') || 'none';
      return `${t} ${kinds}${m.kinds.list ? ` (depth ${m.listDepth})` : ''}${m.error ? ` [${m.error}]` : ''}`;
    });
    return `- ${r.profile.name}, ${r.data.title}, ${r.phase}: ${tools.join('; ')}`;
  }),
  '',
  ...(startup ? [`Start-up: ${startup.how}.`, ''] : []),
  ...(verda ? [verda, ''] : []),
  `The bench took ${f(totalSeconds / 60)} min; by case (all tools, first upload and rerun): ` +
    `${[...caseSeconds].map(([k, s]) => `${k} ${f(s / 60)} min`).join('; ')}. ` +
    `Load average (1 min) at the start ${loadAtStart.toFixed(1)}, at the end ${os.loadavg()[0].toFixed(1)}.`,
];
const report = lines.join('\n');
const out = subset ? path.join(work, 'results.md') : path.join(ROOT, 'bench/results.md');
fs.writeFileSync(out, report + '\n');
console.log(`\n${report}\n\n(written to ${out})`);
