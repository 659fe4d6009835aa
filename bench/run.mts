// `npm run bench`: our sync against the tools an admin would otherwise use (rclone copy
// --checksum, aws s3 sync), on the same data, against the same local S3 server, in one run.
// Prints a markdown table (also written to bench/results.md) with the ratio ours / best peer.
// Not a test: `npm test` does not run it.
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, SECRET, writeRandomFile } from '../test/helpers.ts';
import { startSshd } from '../test/sshd.ts';
import { makeVerda } from '../test/verda-fixture.ts';

const MiB = 1024 * 1024;
// BENCH_SMOKE=1: tiny data, to check the harness itself in seconds.
const smoke = process.env.BENCH_SMOKE === '1';
const BIG = { files: 8, size: (smoke ? 4 : 256) * MiB };
const SMALL = { files: smoke ? 100 : 2000, size: 4096 };
const work = path.join(os.tmpdir(), smoke ? 'comfymulti-bench-smoke' : 'comfymulti-bench');
const has = (cmd: string) => spawnSync('sh', ['-c', 'command -v "$1"', 'sh', cmd]).status === 0;

// --- tools ------------------------------------------------------------------------------------
const missing = [
  ...(has('rclone') ? [] : ['rclone']),
  ...(has('aws') ? [] : ['awscli']),
  ...(fs.existsSync('/usr/bin/time') ? [] : ['time']),
];
if (missing.length) {
  console.log(`installing from Debian: ${missing.join(' ')}`);
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  spawnSync('apt-get', ['update', '-qq'], { stdio: 'inherit', env });
  const r = spawnSync('apt-get', ['install', '-y', '-qq', ...missing], { stdio: 'inherit', env });
  if (r.status !== 0) throw new Error(`apt-get install ${missing.join(' ')} failed`);
}
const version = (cmd: string, args: string[]) => (spawnSync(cmd, args, { encoding: 'utf8' }).stdout || '').split('\n')[0].trim();

// --- data -------------------------------------------------------------------------------------
function makeData(root: string, spec: { files: number; size: number }) {
  const done = path.join(root, '.complete');
  if (fs.existsSync(done)) return;
  fs.rmSync(root, { recursive: true, force: true });
  for (let i = 0; i < spec.files; i++) {
    const file = path.join(root, 'outputs', `user${String(i % 20).padStart(3, '0')}`, `img_${String(i).padStart(5, '0')}.bin`);
    if (spec.size > MiB) writeRandomFile(file, spec.size);
    else {
      fs.mkdirSync(path.dirname(file), { recursive: true });
      fs.writeFileSync(file, crypto.randomBytes(spec.size));
    }
  }
  fs.writeFileSync(done, '');
}
const bigRoot = path.join(work, 'big');
const smallRoot = path.join(work, 'small');
console.log(`data in ${work}: ${BIG.files} × ${BIG.size / MiB} MiB, ${SMALL.files} × ${SMALL.size} B`);
makeData(bigRoot, BIG);
makeData(smallRoot, SMALL);

// --- S3 server --------------------------------------------------------------------------------
const buckets = ['big', 'small'].flatMap((d) => ['ours', 'rclone', 'aws'].map((t) => `bench-${d}-${t}`));
const requestLog = path.join(work, 'requests.log');
fs.writeFileSync(requestLog, '');
const server = spawn(process.execPath, ['--openssl-legacy-provider', '--import', 'tsx', path.join(ROOT, 'bench/s3-server.mts'), requestLog, ...buckets], {
  cwd: ROOT,
  stdio: ['ignore', 'pipe', 'inherit'],
});
const endpoint = await new Promise<string>((resolve) => server.stdout!.once('data', (d) => resolve(String(d).trim())));
const requestCount = () => fs.readFileSync(requestLog, 'utf8').split('\n').filter(Boolean).length;

const baseEnv: NodeJS.ProcessEnv = { ...process.env };
delete baseEnv.AWS_CA_BUNDLE; // a plain-http loopback endpoint
delete baseEnv.NO_COLOR;

interface Measure {
  seconds: number;
  maxRssMb: number;
  requests: number;
}

/** Runs a command under GNU time: wall seconds, peak RSS, and requests the S3 server saw. */
async function measure(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<Measure> {
  const timeFile = path.join(work, 'time.out');
  const before = requestCount();
  const started = process.hrtime.bigint();
  const child = spawn('/usr/bin/time', ['-f', '%M', '-o', timeFile, cmd, ...args], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const code = await new Promise((resolve) => child.on('close', resolve));
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  await new Promise((r) => setTimeout(r, 200)); // let the request log flush
  if (code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${code}: ${stderr.slice(-2000)}`);
  return { seconds, maxRssMb: Number(fs.readFileSync(timeFile, 'utf8').trim().split('\n').pop()) / 1024, requests: requestCount() - before };
}

const tools = {
  ours: (root: string, bucket: string, state: string) =>
    measure(path.join(ROOT, 'backup-mello.mts'), [], {
      ...baseEnv,
      R2_ENDPOINT: endpoint,
      R2_ACCESS_KEY_ID: SECRET,
      R2_SECRET_ACCESS_KEY: SECRET,
      R2_USER_FILES_BUCKET: bucket,
      MELLO_DATA_DIR: root,
      COMFYMULTI_STATE_DIR: state,
    }),
  rclone: (root: string, bucket: string) =>
    measure('rclone', ['copy', '--checksum', path.join(root, 'outputs'), `bench:${bucket}/outputs`], {
      ...baseEnv,
      RCLONE_CONFIG_BENCH_TYPE: 's3',
      RCLONE_CONFIG_BENCH_PROVIDER: 'Other',
      RCLONE_CONFIG_BENCH_ENDPOINT: endpoint,
      RCLONE_CONFIG_BENCH_ACCESS_KEY_ID: SECRET,
      RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY: SECRET,
      RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE: 'true',
      RCLONE_CONFIG_BENCH_REGION: 'auto',
    }),
  aws: (root: string, bucket: string) =>
    measure('aws', ['s3', 'sync', path.join(root, 'outputs'), `s3://${bucket}/outputs`, '--endpoint-url', endpoint, '--only-show-errors'], {
      ...baseEnv,
      AWS_ACCESS_KEY_ID: SECRET,
      AWS_SECRET_ACCESS_KEY: SECRET,
      AWS_DEFAULT_REGION: 'us-east-1',
      AWS_PAGER: '',
    }),
};

type Row = { what: string; ours: Measure; rclone: Measure; aws: Measure; goal: number };
const rows: Row[] = [];
try {
  for (const [name, root, goals] of [
    ['2 GB in 8 files', bigRoot, [1.0, 0.5]],
    ['2,000 small files', smallRoot, [1.0, 0.3]],
  ] as const) {
    const state = fs.mkdtempSync(path.join(work, 'state-'));
    const first: Partial<Row> = { what: `${name}, first upload`, goal: goals[0] };
    const rerun: Partial<Row> = { what: `${name}, unchanged rerun`, goal: goals[1] };
    const tag = root === bigRoot ? 'big' : 'small';
    for (const tool of ['ours', 'rclone', 'aws'] as const) {
      const bucket = `bench-${tag}-${tool}`;
      console.log(`${name}: ${tool} first upload…`);
      first[tool] = await tools[tool](root, bucket, state);
      console.log(`${name}: ${tool} rerun…`);
      rerun[tool] = await tools[tool](root, bucket, state);
    }
    rows.push(first as Row, rerun as Row);
  }
} finally {
  server.kill('SIGTERM');
}

// --- backup-verda --quick against the fixture over a real sshd ----------------------------------
console.log('backup-verda --quick against the fixture…');
const sshd = await startSshd(['verda']);
const fixtureRoot = fs.mkdtempSync(path.join(work, 'verda-'));
const fixture = makeVerda(path.join(fixtureRoot, 'verda'));
const s3b = spawn(process.execPath, ['--openssl-legacy-provider', '--import', 'tsx', path.join(ROOT, 'bench/s3-server.mts'), path.join(fixtureRoot, 'req.log'), 'comfy-multi-cache', 'comfy-multi-model-vault-backup'], {
  cwd: ROOT,
  stdio: ['ignore', 'pipe', 'inherit'],
});
const endpoint2 = await new Promise<string>((resolve) => s3b.stdout!.once('data', (d) => resolve(String(d).trim())));
const verdaEnv = {
  ...baseEnv,
  ...fixture.env,
  R2_ENDPOINT: endpoint2,
  R2_ACCESS_KEY_ID: SECRET,
  R2_SECRET_ACCESS_KEY: SECRET,
  VERDA_HOST: 'verda',
  SSH_CONFIG: sshd.config,
  BACKUP_DIR: path.join(fixtureRoot, 'backups'),
  COMFYMULTI_STATE_DIR: path.join(fixtureRoot, 'state'),
};
const quick: { seconds: number; connections: number }[] = [];
try {
  for (let i = 0; i < 3; i++) {
    const before = sshd.connections();
    const started = process.hrtime.bigint();
    const r = spawnSync(path.join(ROOT, 'backup-verda.mts'), ['--quick'], { env: verdaEnv, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`backup-verda --quick: ${r.stdout}${r.stderr}`);
    quick.push({ seconds: Number(process.hrtime.bigint() - started) / 1e9, connections: sshd.connections() - before });
    await new Promise((r) => setTimeout(r, 1000)); // a new timestamp
  }
} finally {
  s3b.kill('SIGTERM');
  await sshd.stop();
  fs.rmSync(fixtureRoot, { recursive: true, force: true });
}

// --- report -----------------------------------------------------------------------------------
const f = (n: number) => (n < 10 ? n.toFixed(2) : n.toFixed(1));
const lines = [
  `Measured ${new Date().toISOString().slice(0, 10)} on ${os.cpus().length} × ${os.cpus()[0]?.model.trim()}, ${Math.round(os.totalmem() / 2 ** 30)} GiB, ${os.type()} ${os.release()}, Node ${process.version}; ${version('rclone', ['version'])}; ${version('aws', ['--version'])}. S3 server: s3rver on loopback (the same for every tool).`,
  '',
  '| case | ours s | rclone s | aws s | ours / best peer | goal | requests (ours / rclone / aws) |',
  '|---|---:|---:|---:|---:|---:|---|',
  ...rows.map((r) => {
    const ratio = r.ours.seconds / Math.min(r.rclone.seconds, r.aws.seconds);
    return `| ${r.what} | ${f(r.ours.seconds)} | ${f(r.rclone.seconds)} | ${f(r.aws.seconds)} | ${ratio.toFixed(2)} ${ratio <= r.goal ? '✓' : '✗'} | ≤ ${r.goal} | ${r.ours.requests} / ${r.rclone.requests} / ${r.aws.requests} |`;
  }),
  '',
  `Peak RSS while sending the 2 GB: ours ${Math.round(rows[0].ours.maxRssMb)} MB (goal < 256 MB), rclone ${Math.round(rows[0].rclone.maxRssMb)} MB, aws ${Math.round(rows[0].aws.maxRssMb)} MB.`,
  '',
  `backup-verda.mts --quick against the fixture over a real sshd: ${quick.map((q) => `${f(q.seconds)} s, ${q.connections} SSH connection${q.connections === 1 ? '' : 's'}`).join('; ')} (three runs; the bash original opened 25 connections).`,
];
const report = lines.join('\n');
fs.writeFileSync(path.join(ROOT, 'bench/results.md'), report + '\n');
console.log(`\n${report}`);
