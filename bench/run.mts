// `npm run bench`: our scripts against the tools an admin would otherwise use, on the same data,
// against the same S3 server, in one run, over links that have a ceiling (bench/wan-proxy.mts
// says what they model: a round trip, a rate per connection, a cap on the sum):
// - link: the proxy checked first: one stream comes out at the rate per connection, many at the
//   cap, and what the proxy's CPU costs (bench/link-check.mts);
// - big, bigfile, small, huge: our sync (backup-mello.mts) against `rclone copy --checksum` and
//   `aws s3 sync`, first upload and unchanged rerun (each tool its own bucket per run);
// - restore: restore-verda's models against `aws s3 sync` of the models bucket;
// - morning: a fresh Verda from R2 alone (restore-verda --from r2: config, image, models) against
//   its floor, and `aws s3 sync` + `aws s3 cp` as a baseline (bench/restore-cases.mts);
// - startup, verda: `--help`'s start-up, backup-verda --quick over a real sshd.
// Each case runs --runs times (3): the table gives the median and the spread (fastest–slowest), a
// line fraction (bytes that had to move / (seconds × the profile's cap)) and the peak RSS of each
// tool. A full run writes bench/results.md; a subset, results.md in the work dir (or --out).
// Not a test: `npm test` does not run it. `npm run bench -- --help` for the options.
import { CreateBucketCommand, DeleteObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import minimist from 'minimist';
import { ROOT, writeRandomFile } from '../test/helpers.ts';
import {
  baseEnv,
  f,
  has,
  measure,
  median,
  medianRun,
  MiB,
  n,
  pct,
  spread,
  version,
  work,
  type Measure,
} from './common.mts';
import { checkLink, linkTable, type LinkFigure } from './link-check.mts';
import {
  loadAlone,
  modelsRestoreCase,
  morningCase,
  morningFloor,
  openRestoreLink,
  prepareRestoreData,
  type ModelsRun,
  type MorningRun,
  type RestoreData,
} from './restore-cases.mts';
import { loadServer, type RunningServer } from './servers.mts';
import {
  capped,
  DEFAULT_PROFILES,
  describeProfile,
  Link,
  lineFraction,
  PROFILES,
  WanProxy,
  type WanProfile,
} from './wan-proxy.mts';

const USAGE = `Usage: npm run bench -- [--quick] [--profile P,...] [--case C,...] [--runs N] [--server S] [--out FILE]

  --profile   loopback, eu, far (default: these three); eu-nocap, far-nocap: issue 13's profiles
              (a rate per connection, no cap on the sum)
  --case      link (the proxy's own check), big (400 MB in 4 files), bigfile (one 2 GB file),
              small (2,000 files), huge (200,000 files, loopback only), restore (2 GiB of models
              restored), morning (a fresh Verda from R2 alone: config, a 2.5 GB image, models),
              startup (--help of a script), verda (backup-verda --quick over sshd); default: all
  --runs      runs of each tool per case (default 3; 1 with --quick): the median and the spread
  --image-mb  the morning's worker image, MiB (default 2400; --quick 128)
  --quick     smaller data, one run (a harness check in minutes; the figures mean little)
  --server    s3rver (default), rgw (Ceph RGW), or a module exporting benchServer (bench/servers.mts)
  --out       where the results go (default: bench/results.md for a full run, else the work dir)
BENCH_TRACE=1 writes each run's requests and the link's bytes over time to the work dir
(bench/trace-summary.mts reads them); BENCH_CPU_PROF=1 has the Node on "Verda" write CPU profiles.`;

const argv = minimist(process.argv.slice(2), {
  boolean: ['quick', 'help'],
  string: ['profile', 'case', 'server', 'runs', 'image-mb', 'out'],
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
const runs = argv.runs ? Number(argv.runs) : quick ? 1 : 3;
if (!Number.isInteger(runs) || runs < 1) {
  console.error(`--runs must be a whole number of at least 1\n${USAGE}`);
  process.exit(2);
}
const imageBytes = Math.round(Number(argv['image-mb'] ?? (quick ? 128 : 2400)) * MiB);

type CaseId = 'link' | 'big' | 'bigfile' | 'small' | 'huge' | 'restore' | 'morning' | 'startup' | 'verda';
const ALL_CASES: CaseId[] = ['link', 'big', 'bigfile', 'small', 'huge', 'restore', 'morning', 'startup', 'verda'];
const pick = <T extends string>(value: string | undefined, all: readonly T[], what: string, dflt = all): T[] => {
  if (!value) return [...dflt];
  const picked = value.split(',').map((s) => s.trim().toLowerCase());
  for (const p of picked) {
    if (!all.includes(p as T)) {
      console.error(`unknown ${what} ${p}: one of ${all.join(', ')}`);
      process.exit(2);
    }
  }
  return picked as T[];
};
const profileIds = pick(argv.profile, Object.keys(PROFILES), 'profile', DEFAULT_PROFILES);
const profiles = profileIds.map((p) => PROFILES[p]);
const caseIds = pick<CaseId>(argv.case, ALL_CASES, 'case');
const subset = Boolean(argv.profile || argv.case || argv.server || quick || argv.runs || argv['image-mb']);

interface DataCase {
  id: 'big' | 'bigfile' | 'small' | 'huge';
  title: string;
  files: number;
  size: number;
  /** Files spread over this many outputs/userNNN/ directories. */
  users: number;
  /** The 200,000-key case runs on loopback only: over WAN it would take hours of s3rver. */
  loopbackOnly?: boolean;
  /** Issue 13's peak RSS goal for ours, MB (every case has issue 22's 256 MB). */
  rssGoalMb?: number;
  /** Big files: issue 22's line goal for the first upload, and the buckets emptied after each run (disk). */
  big?: boolean;
}
const DATA: DataCase[] = [
  quick
    ? { id: 'big', title: '128 MiB in 4 files', files: 4, size: 32 * MiB, users: 4, big: true }
    : { id: 'big', title: '400 MB in 4 files', files: 4, size: 100e6, users: 4, big: true },
  quick
    ? { id: 'bigfile', title: 'one 256 MiB file', files: 1, size: 256 * MiB, users: 1, big: true }
    : { id: 'bigfile', title: 'one 2 GB file', files: 1, size: 2e9, users: 1, big: true },
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
const MODELS = quick ? { files: 8, size: 16 * MiB } : { files: 8, size: 256 * MiB };
const TOOLS = ['ours', 'rclone', 'aws'] as const;
type Tool = (typeof TOOLS)[number];
/** Issue 22: every case's peak RSS. */
const RSS_GOAL_MB = 256;

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
// The bundle is what `npm ci` leaves and what the admin runs; without it we would time tsx.
if (spawnSync(process.execPath, ['build.mjs'], { cwd: ROOT, stdio: 'inherit' }).status !== 0)
  throw new Error('build failed');

// --- data -------------------------------------------------------------------------------------
function dataRoot(d: DataCase): string {
  const root = path.join(work, `${d.id === 'bigfile' ? 'big' : d.id}-${d.files}x${d.size}`);
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

// --- one run of one tool ------------------------------------------------------------------------
function runTool(
  tool: Tool,
  proxy: WanProxy,
  link: Link,
  srv: RunningServer,
  root: string,
  bucket: string,
  state: string,
  timeoutS: number,
  label: string,
): Promise<Measure> {
  const { accessKeyId, secretAccessKey } = srv.keys;
  const endpoint = proxy.endpoint;
  const o = { proxy, link, timeoutS, label: `${label}-${tool}` };
  if (tool === 'ours')
    return measure(
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
      o,
    );
  if (tool === 'rclone')
    return measure(
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
      o,
    );
  return measure(
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
    o,
  );
}

/** A big case's objects deleted after its runs (disk: 9 runs of 2 GB on each profile). */
async function emptyBucket(admin: S3Client, bucket: string) {
  const page = await admin.send(new ListObjectsV2Command({ Bucket: bucket }));
  for (const o of page.Contents ?? []) await admin.send(new DeleteObjectCommand({ Bucket: bucket, Key: o.Key! }));
}

// --- the upload cases: rows and goals -------------------------------------------------------------
interface Row {
  profile: WanProfile;
  data: DataCase;
  phase: 'first upload' | 'unchanged rerun';
  m: Record<Tool, Measure[]>;
}
const ok = (ms: Measure[]) => ms.filter((m) => !m.error);
const secondsOf = (ms: Measure[]) => ok(ms).map((m) => m.seconds);
const med = (ms: Measure[]) => (ok(ms).length ? median(secondsOf(ms)) : undefined);
const peakRss = (ms: Measure[]) => Math.max(0, ...ms.map((m) => Math.max(m.rssMb, m.remoteRssMb)));
const failedNote = (ms: Measure[]) => (ms.length - ok(ms).length ? ` (${ms.length - ok(ms).length} failed)` : '');

/** Ours / the faster peer, by medians; undefined when ours or both peers failed. */
function ratioOf(r: Row): number | undefined {
  const ours = med(r.m.ours);
  const peers = [med(r.m.rclone), med(r.m.aws)].filter((x): x is number => x !== undefined);
  return ours === undefined || !peers.length ? undefined : ours / Math.min(...peers);
}

const dataBytes = (d: DataCase) => d.files * d.size;
/** The line fraction of a tool's median first upload; undefined on a rerun or without a cap. */
function lineOf(r: Row, tool: Tool): number | undefined {
  const s = med(r.m[tool]);
  return r.phase === 'first upload' && s !== undefined ? lineFraction(dataBytes(r.data), s, r.profile) : undefined;
}

interface Goal {
  text: string;
  met: boolean | undefined;
  miss: string;
}

/** The row's goals (issue 13's ratios, issue 22's line and RSS), each with whether ours met it. */
function goals(r: Row): Goal[] {
  const ours = medianRun(ok(r.m.ours).length ? ok(r.m.ours) : r.m.ours);
  const ratio = ratioOf(r);
  const rerun = r.phase === 'unchanged rerun';
  const limit = rerun ? 0.5 : 0.7;
  const out: Goal[] = [
    { text: `≤ ${limit}`, met: ratio === undefined ? undefined : ratio <= limit, miss: `ratio ${ratio?.toFixed(2)}` },
  ];
  if (r.data.big && !rerun && capped(r.profile)) {
    const line = lineOf(r, 'ours');
    out.push({ text: 'line ≥ 0.85', met: line === undefined ? undefined : line >= 0.85, miss: `line ${pct(line)}` });
  }
  const rss = peakRss(r.m.ours);
  const rssGoal = r.data.rssGoalMb ?? RSS_GOAL_MB;
  out.push({ text: `RSS < ${rssGoal} MB`, met: rss < rssGoal, miss: `RSS ${Math.round(rss)} MB` });
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

const metText = (g: Goal[], note = '') =>
  (g.some((x) => x.met === undefined)
    ? '?'
    : g.every((x) => x.met)
      ? '✓'
      : `✗ ${g
          .filter((x) => !x.met)
          .map((x) => x.miss)
          .join(', ')}`) + note;

// --- the runs -----------------------------------------------------------------------------------
const rows: Row[] = [];
const caseSeconds = new Map<string, number>();
const timeCase = async (name: string, body: () => Promise<void>) => {
  const t = performance.now();
  await body();
  caseSeconds.set(name, (caseSeconds.get(name) ?? 0) + (performance.now() - t) / 1000);
};
const serverKind = await loadServer(argv.server || 's3rver');

let linkFigures: LinkFigure[] | undefined;
if (caseIds.includes('link')) {
  await timeCase('link check', async () => {
    console.log('the link itself: one stream, 16 streams, raw TCP and HTTP…');
    linkFigures = await checkLink(profiles, quick ? 1.5 : 4);
    console.log(linkTable(linkFigures));
  });
}

const restoreRuns = new Map<string, ModelsRun>();
const morningRuns = new Map<string, MorningRun>();
let loadTimes: number[] = [];
let restoreData: RestoreData | undefined;
const runsOn = (p: WanProfile) => dataCases.filter((d) => !d.loopbackOnly || p.name === 'loopback');
const wantRestore = caseIds.includes('restore') || caseIds.includes('morning');
if (profiles.some((p) => runsOn(p).length) || wantRestore) {
  const roots = new Map(dataCases.map((d) => [d.id, dataRoot(d)]));
  console.log(`S3 server: ${serverKind.describe}`);
  const srv = await serverKind.start();
  const admin = new S3Client({ endpoint: srv.endpoint, region: 'auto', forcePathStyle: true, credentials: srv.keys });
  try {
    for (const profile of profiles) {
      const link = new Link(profile);
      const proxy = await WanProxy.start(srv.endpoint, link);
      try {
        for (const d of runsOn(profile)) {
          await timeCase(`${profile.name}, ${d.title}`, async () => {
            const first = { profile, data: d, phase: 'first upload', m: { ours: [], rclone: [], aws: [] } } as Row;
            const rerun = { profile, data: d, phase: 'unchanged rerun', m: { ours: [], rclone: [], aws: [] } } as Row;
            // Generous, but a run always ends: 200,000 files through s3rver take minutes per tool.
            const timeoutS = d.id === 'huge' ? 3600 : 1800;
            for (let i = 0; i < runs; i++) {
              for (const tool of TOOLS) {
                // A bucket and a hash cache of its own: each first upload is a first upload.
                const bucket = `${profile.name.replace(/\W+/g, '-').toLowerCase()}-${d.id}-${tool}-${Date.now().toString(36)}`;
                const state = fs.mkdtempSync(path.join(work, 'state-'));
                await admin.send(new CreateBucketCommand({ Bucket: bucket }));
                for (const [row, what] of [
                  [first, 'first upload'],
                  [rerun, 'rerun'],
                ] as const) {
                  process.stdout.write(`${profile.name}, ${d.title}: ${tool} ${what} ${i + 1}… `);
                  const label = `${profile.name}-${d.id}-${what.replace(' ', '-')}-run${i + 1}`;
                  const m = await runTool(tool, proxy, link, srv, roots.get(d.id)!, bucket, state, timeoutS, label);
                  row.m[tool].push(m);
                  const line = what === 'first upload' ? lineFraction(dataBytes(d), m.seconds, profile) : undefined;
                  console.log(
                    m.error
                      ? `FAILED ${m.error}`
                      : `${m.seconds.toFixed(2)} s${line === undefined ? '' : `, line ${line.toFixed(2)}`}, ` +
                          `${m.requests} requests, ${Math.round(m.rssMb)} MB`,
                  );
                }
                fs.rmSync(state, { recursive: true, force: true });
                if (d.big) await emptyBucket(admin, bucket);
              }
            }
            rows.push(first, rerun);
          });
        }
      } finally {
        await proxy.close();
      }
    }

    if (wantRestore) {
      const wantMorning = caseIds.includes('morning');
      restoreData = await prepareRestoreData(srv, { ...MODELS, imageBytes: wantMorning ? imageBytes : undefined });
      try {
        if (wantMorning) {
          await timeCase('morning: the image load alone', async () => {
            process.stdout.write(`the image's load alone (gzip -dc | podman load), ${runs} runs… `);
            loadTimes = loadAlone(restoreData!, runs);
            console.log(loadTimes.map((t) => t.toFixed(1)).join(', ') + ' s');
          });
        }
        for (const profile of profiles) {
          const rl = await openRestoreLink(srv, restoreData, profile);
          try {
            if (caseIds.includes('restore'))
              await timeCase(`${profile.name}, models restore`, async () => {
                restoreRuns.set(profile.name, await modelsRestoreCase(srv, restoreData!, rl, runs, 1800));
              });
            if (wantMorning)
              await timeCase(`${profile.name}, the morning`, async () => {
                morningRuns.set(profile.name, await morningCase(srv, restoreData!, rl, runs, 3600));
              });
          } finally {
            await rl.close();
          }
        }
      } finally {
        await restoreData.stop();
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
  const times: number[] = [];
  const conns: number[] = [];
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
    for (let i = 0; i < Math.max(3, runs); i++) {
      const before = sshd.connections();
      const started = performance.now();
      const r = spawnSync(path.join(ROOT, 'backup-verda.mts'), ['--quick'], { env, encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`backup-verda --quick: ${r.stdout}${r.stderr}`);
      conns.push(sshd.connections() - before);
      times.push((performance.now() - started) / 1000);
      await new Promise((r) => setTimeout(r, 1000)); // a new timestamp
    }
    verda =
      `backup-verda.mts --quick against the fixture over a real sshd (loopback, no proxy), ${times.length} runs: ` +
      `${spread(times)} s, SSH connections per run: ${[...new Set(conns)].join(', ')} ` +
      '(the bash original opened 25).';
  } finally {
    admin.destroy();
    await srv.stop();
    await sshd.stop();
    fs.rmSync(fixtureRoot, { recursive: true, force: true });
  }
}

// --- report -----------------------------------------------------------------------------------
const totalSeconds = (performance.now() - benchStarted) / 1000;
const mb = (x: number) => String(Math.round(x));
const lines: string[] = [
  `Measured ${new Date().toISOString().slice(0, 10)} on ${os.cpus().length} × ${os.cpus()[0]?.model.trim()}, ` +
    `${Math.round(os.totalmem() / 2 ** 30)} GiB, ${os.type()} ${os.release()}, Node ${process.version}; ` +
    `${version('rclone', ['version'])}; ${version('aws', ['--version'])}; ${version('podman', ['--version'])}. ` +
    `S3 server: ${serverKind.describe}, behind the WAN proxy (bench/wan-proxy.mts) for every tool. Profiles: ` +
    `${profiles.map(describeProfile).join('; ')}. Each figure: the median of ${runs} run${runs > 1 ? 's' : ''}` +
    `${runs > 1 ? ' (fastest–slowest)' : ''}; line: bytes that had to move / (seconds × the cap).` +
    `${quick ? ' --quick sizes.' : ''}`,
  '',
];

if (linkFigures) {
  lines.push(
    '**The link itself** (bench/link-check.mts: streams through the proxy between two processes of their own; ' +
      "MB/s from the first byte received to the last; the proxy's CPU time over those seconds):",
    '',
    linkTable(linkFigures),
    '',
  );
}

if (rows.length) {
  lines.push(
    '**Uploads** (backup-mello against rclone and aws-cli):',
    '',
    '| profile | case | ours s | rclone s | aws s | ours / best | line ours / rclone / aws | goal | met | ' +
      'requests ours / rclone / aws | peak RSS MB ours / rclone / aws |',
    '|---|---|---:|---:|---:|---:|---|---|---|---|---|',
    ...rows.map((r) => {
      const g = goals(r);
      const ratio = ratioOf(r)?.toFixed(2) ?? '—';
      const lineText =
        r.phase === 'first upload' && capped(r.profile) ? TOOLS.map((t) => pct(lineOf(r, t))).join(' / ') : '—';
      const reqs = TOOLS.map((t) => (r.m[t].length ? n(medianRun(r.m[t]).requests) : '—')).join(' / ');
      return (
        `| ${r.profile.name} | ${r.data.title}, ${r.phase} | ` +
        `${TOOLS.map((t) => spread(secondsOf(r.m[t])) + failedNote(r.m[t])).join(' | ')} | ${ratio} | ${lineText} | ` +
        `${g.map((x) => x.text).join(', ')} | ${metText(g)} | ${reqs} | ` +
        `${TOOLS.map((t) => mb(peakRss(r.m[t]))).join(' / ')} |`
      );
    }),
    '',
    'Requests by kind, of the median run (list: ListObjectsV2; depth: listing round trips one after the other):',
    '',
    ...rows.map((r) => {
      const tools = TOOLS.map((t) => {
        if (!r.m[t].length) return `${t} —`;
        const m = medianRun(r.m[t]);
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
  );
}

if (restoreRuns.size && restoreData) {
  const size = `${(restoreData.models.bytes / 1e9).toFixed(1)} GB in ${restoreData.models.files} files`;
  lines.push(
    `**Models restore** (${size}, into an empty directory: restore-verda --only models, Verda over ssh ` +
      'on the same link, against `aws s3 sync` of the bucket):',
    '',
    '| profile | restore-verda s | aws s3 sync s | ours / aws | line ours / aws | goal | met | ' +
      'GETs ours / aws | connections ours / aws | models step s | no-op restore s | peak RSS MB Mello / Verda / aws |',
    '|---|---:|---:|---:|---|---|---|---|---|---:|---:|---|',
    ...profiles
      .filter((p) => restoreRuns.has(p.name))
      .map((p) => {
        const r = restoreRuns.get(p.name)!;
        const [ours, aws] = [med(r.ours), med(r.aws)];
        const ratio = ours !== undefined && aws !== undefined ? ours / aws : undefined;
        const line = (s?: number) => (s === undefined ? undefined : lineFraction(restoreData!.models.bytes, s, p));
        const g: Goal[] = capped(p)
          ? [
              {
                text: 'line ≥ 0.9',
                met: line(ours) === undefined ? undefined : line(ours)! >= 0.9,
                miss: `line ${pct(line(ours))}`,
              },
            ]
          : [
              {
                text: '≤ 0.9 of aws',
                met: ratio === undefined ? undefined : ratio <= 0.9,
                miss: `ratio ${pct(ratio)}`,
              },
            ];
        const rssOurs = Math.max(...r.ours.map((m) => m.rssMb));
        const rssVerda = Math.max(...r.ours.map((m) => m.remoteRssMb));
        g.push({
          text: `RSS < ${RSS_GOAL_MB} MB`,
          met: Math.max(rssOurs, rssVerda) < RSS_GOAL_MB,
          miss: `RSS ${mb(Math.max(rssOurs, rssVerda))} MB`,
        });
        const mo = r.ours.length ? medianRun(r.ours) : undefined;
        const ma = r.aws.length ? medianRun(r.aws) : undefined;
        return (
          `| ${p.name} | ${spread(secondsOf(r.ours))}${failedNote(r.ours)} | ${spread(secondsOf(r.aws))}${failedNote(r.aws)} | ` +
          `${pct(ratio)} | ${capped(p) ? `${pct(line(ours))} / ${pct(line(aws))}` : '—'} | ${g.map((x) => x.text).join(', ')} | ` +
          `${metText(g)} | ${mo?.kinds.get ?? 0} / ${ma?.kinds.get ?? 0} | ${mo?.connections ?? 0} / ${ma?.connections ?? 0} | ` +
          `${r.modelsStep.length ? spread(r.modelsStep) : '—'} | ${r.noop ? f(r.noop.seconds) : '—'} | ` +
          `${mb(rssOurs)} / ${mb(rssVerda)} / ${mb(peakRss(r.aws))} |`
        );
      }),
    '',
  );
}

if (morningRuns.size && restoreData?.image) {
  const img = restoreData.image;
  lines.push(
    `**The morning: a fresh Verda from R2 alone** (restore-verda --from r2, an empty BACKUP_DIR on Mello and ` +
      `an empty tree for Verda: the config bundle, a ${(img.bytes / 1e9).toFixed(2)} GB worker image downloaded by Verda ` +
      `from the cache bucket (a presigned URL) and loaded with podman, ${(restoreData.models.bytes / 1e9).toFixed(1)} GB of models downloaded by Verda). ` +
      `Floor: models / cap + 2 × image / cap + the image's load alone (gzip -dc | podman load: ${spread(loadTimes)} s) ` +
      "+ 3 round trips (issue 22's floor, from when Mello relayed the image: it crossed the link twice; it now crosses once). Baseline only: `aws s3 sync` of the models then `aws s3 cp` of the image, on one machine.",
    '',
    '| profile | restore-verda s | floor s (models + 2 × image + load + 3 RTT) | ours / floor | goal | met | ' +
      'steps s: image / models / the rest | baseline aws s | peak RSS MB Mello / Verda |',
    '|---|---:|---|---:|---|---|---|---:|---|',
    ...profiles
      .filter((p) => morningRuns.has(p.name))
      .map((p) => {
        const r = morningRuns.get(p.name)!;
        const ours = med(r.ours);
        const floor = capped(p) ? morningFloor(restoreData!, p, loadTimes) : undefined;
        const ratio = ours !== undefined && floor ? ours / floor.total : undefined;
        const g: Goal[] = floor
          ? [
              {
                text: '≤ 1.15 of the floor',
                met: ratio === undefined ? undefined : ratio <= 1.15,
                miss: `${pct(ratio)} of the floor`,
              },
            ]
          : [];
        const rssMello = Math.max(...r.ours.map((m) => m.rssMb));
        const rssVerda = Math.max(...r.ours.map((m) => m.remoteRssMb));
        g.push({
          text: `RSS < ${RSS_GOAL_MB} MB`,
          met: Math.max(rssMello, rssVerda) < RSS_GOAL_MB,
          miss: `RSS ${mb(Math.max(rssMello, rssVerda))} MB`,
        });
        const stepOf = (pred: (name: string) => boolean) =>
          r.steps.map((ss) => ss.filter((s) => pred(s.name)).reduce((a, s) => a + s.s, 0));
        const image = stepOf((nm) => nm.startsWith('Worker image'));
        const models = stepOf((nm) => nm.startsWith('Models'));
        const rest = r.ours.map((m, i) => m.seconds - (image[i] ?? 0) - (models[i] ?? 0));
        const floorText = floor
          ? `${f(floor.total)} (${f(floor.models)} + ${f(floor.image)} + ${f(floor.load)} + ${f(floor.rtts)})`
          : '— (no cap)';
        return (
          `| ${p.name} | ${spread(secondsOf(r.ours))}${failedNote(r.ours)} | ${floorText} | ${pct(ratio)} | ` +
          `${g.map((x) => x.text).join(', ')} | ${metText(g)} | ${spread(image)} / ${spread(models)} / ${spread(rest)} | ` +
          `${spread(secondsOf(r.baseline))}${failedNote(r.baseline)} | ${mb(rssMello)} / ${mb(rssVerda)} |`
        );
      }),
    '',
  );
  for (const p of profiles.filter((x) => morningRuns.has(x.name))) {
    const r = morningRuns.get(p.name)!;
    const errors = [...r.ours, ...r.baseline].filter((m) => m.error).map((m) => m.error);
    if (errors.length) lines.push(`- ${p.name}, the morning, failures: ${errors.join('; ')}`, '');
  }
}
for (const [name, r] of restoreRuns) {
  const errors = [...r.ours, ...r.aws].filter((m) => m.error).map((m) => m.error);
  if (errors.length) lines.push(`- ${name}, models restore, failures: ${errors.join('; ')}`, '');
}

if (startup) {
  lines.push(
    `Start-up, backup-mello.mts --help: ${startup.how} (goal < 0.1 s: ${startup.seconds < 0.1 ? '✓' : '✗'}).`,
    '',
  );
}
if (verda) lines.push(verda, '');
lines.push(
  `The bench took ${f(totalSeconds / 60)} min; by case (all tools and runs): ` +
    `${[...caseSeconds].map(([k, s]) => `${k} ${f(s / 60)} min`).join('; ')}. ` +
    `Load average (1 min) at the start ${loadAtStart.toFixed(1)}, at the end ${os.loadavg()[0].toFixed(1)}.`,
);
const report = lines.join('\n');
const out = argv.out
  ? path.resolve(String(argv.out))
  : subset
    ? path.join(work, 'results.md')
    : path.join(ROOT, 'bench/results.md');
fs.writeFileSync(out, report + '\n');
console.log(`\n${report}\n\n(written to ${out})`);
