// restore-verda's models against `aws s3 sync` of the same bucket, in one run, on the same local S3
// server: 2 GB of models (8 × 256 MiB) into an empty directory, then a second, no-op restore; and
// the SSH connections a restore opens (the sshd's log). Verda is this machine over a real sshd
// on loopback, as in the tests.
//   node --openssl-legacy-provider --import tsx bench/restore.mts     (BENCH_SMOKE=1: 8 × 4 MiB)
// Needs aws-cli (`npm run bench` installs it, or apt-get install awscli). Prints a markdown table.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { R2Backend } from '../lib/r2.ts';
import { syncTree } from '../lib/sync.ts';
import { ROOT, SECRET, writeRandomFile } from '../test/helpers.ts';
import { startSshd } from '../test/sshd.ts';
import { makeVerda } from '../test/verda-fixture.ts';

const MiB = 1024 * 1024;
const smoke = process.env.BENCH_SMOKE === '1';
const MODELS = { files: 8, size: (smoke ? 4 : 256) * MiB };
const BUCKET = 'comfy-multi-model-vault-backup';
const work = path.join(os.tmpdir(), smoke ? 'comfymulti-bench-restore-smoke' : 'comfymulti-bench-restore');
const ROUNDS = 2;

if (spawnSync('sh', ['-c', 'command -v aws']).status !== 0)
  throw new Error('aws-cli not found: apt-get install awscli');
const version = (cmd: string, args: string[]) =>
  (spawnSync(cmd, args, { encoding: 'utf8' }).stdout || '').split('\n')[0].trim();

// The bundle Verda runs, built now: a restore reads dist/restore-verda.mjs as `npm ci` leaves it.
const built = spawnSync(process.execPath, [path.join(ROOT, 'build.mjs')], { cwd: ROOT, encoding: 'utf8' });
if (built.status !== 0) throw new Error(`build.mjs: ${built.stderr}`);

// --- data: models on "Verda", a small backup on "Mello" ----------------------------------------
fs.mkdirSync(work, { recursive: true });
const source = path.join(work, 'source-models');
if (!fs.existsSync(path.join(source, '.complete'))) {
  fs.rmSync(source, { recursive: true, force: true });
  for (let i = 0; i < MODELS.files; i++) {
    writeRandomFile(path.join(source, `checkpoints/model-${i}.safetensors`), MODELS.size);
  }
  fs.writeFileSync(path.join(source, '.complete'), '');
}
const requestLog = path.join(work, 'requests.log');
fs.writeFileSync(requestLog, '');
const server = spawn(
  process.execPath,
  [
    '--openssl-legacy-provider',
    '--import',
    'tsx',
    path.join(ROOT, 'bench/s3-server.mts'),
    requestLog,
    BUCKET,
    'comfy-multi-cache',
  ],
  { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] },
);
const endpoint = await new Promise<string>((resolve) => server.stdout!.once('data', (d) => resolve(String(d).trim())));
const requests = () => fs.readFileSync(requestLog, 'utf8').split('\n').filter(Boolean);
const sshd = await startSshd(['verda']);

try {
  const target = { bucket: BUCKET, endpoint, accessKeyId: SECRET, secretAccessKey: SECRET };
  // The models bucket as backup-verda leaves it: sha256 metadata on every object.
  const sent = await syncTree({
    root: source,
    backend: new R2Backend(target),
    prefix: '',
    filter: (rel) => rel.endsWith('.safetensors'),
  });
  if (sent.failures.length) throw new Error(`upload: ${JSON.stringify(sent.failures)}`);

  const verda = makeVerda(path.join(work, 'verda'));
  const backupDir = path.join(work, 'mello-backups');
  fs.rmSync(backupDir, { recursive: true, force: true });
  const env: NodeJS.ProcessEnv = {
    PATH: process.env.PATH,
    HOME: process.env.HOME,
    R2_ENDPOINT: endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    COMFYMULTI_STATE_DIR: path.join(work, 'state'),
    BACKUP_DIR: backupDir,
    ...verda.env,
  };
  const quick = spawnSync(path.join(ROOT, 'backup-verda.mts'), ['--quick'], {
    env: { ...env, VERDA_HOST: 'local' },
    encoding: 'utf8',
  });
  if (quick.status !== 0) throw new Error(`backup-verda --quick: ${quick.stdout}${quick.stderr}`);

  const restoreEnv = { ...env, VERDA_HOST: 'verda', SSH_CONFIG: sshd.config, VERDA_SUDO: '' };
  const awsEnv: NodeJS.ProcessEnv = { ...env, AWS_ACCESS_KEY_ID: SECRET, AWS_SECRET_ACCESS_KEY: SECRET };
  delete awsEnv.AWS_CA_BUNDLE; // a plain-http loopback endpoint

  /** Wall seconds of a command; its requests to the server; the SSH connections it opened. */
  const run = async (cmd: string, args: string[], runEnv: NodeJS.ProcessEnv) => {
    // Untimed: what the run before left dirty is written out now, not during this one. (A
    // restore fsyncs each model before its rename; aws s3 sync leaves its bytes in the page cache.)
    spawnSync('sync');
    const before = requests().length;
    const connections = sshd.connections();
    const started = process.hrtime.bigint();
    const child = spawn(cmd, args, { env: runEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    let said = '';
    child.stdout.on('data', (d) => (said += d));
    child.stderr.on('data', (d) => (said += d));
    const code = await new Promise((resolve) => child.on('close', resolve));
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    await new Promise((r) => setTimeout(r, 200)); // the request log flushes
    if (code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${code}:\n${said.slice(-3000)}`);
    const gets = requests()
      .slice(before)
      .filter((l) => l.startsWith('GET ') && !l.includes('list-type')).length;
    return { seconds, gets, connections: sshd.connections() - connections, said };
  };
  const fresh = (name: string) => {
    const dir = path.join(work, name);
    fs.rmSync(dir, { recursive: true, force: true });
    return dir;
  };
  const ours = async (root: string) => {
    const r = await run(
      path.join(ROOT, 'restore-verda.mts'),
      ['--only', 'models', '--root', root, '--json'],
      restoreEnv,
    );
    const json = JSON.parse(r.said.slice(r.said.indexOf('\n{') + 1));
    const models = json.steps.find((x: { name: string }) => x.name.startsWith('Models'));
    return { ...r, said: models.summary as string, modelsStep: models.ms / 1000 };
  };
  const aws = (dir: string) =>
    run('aws', ['s3', 'sync', `s3://${BUCKET}`, dir, '--endpoint-url', endpoint, '--only-show-errors'], awsEnv);

  const rows: string[] = [];
  const oursTimes: number[] = [];
  const modelSteps: number[] = [];
  const awsTimes: number[] = [];
  let connections = 0;
  let oursGets = 0;
  let awsGets = 0;
  for (let round = 1; round <= ROUNDS; round++) {
    // Alternated, each into an empty directory: neither always runs on a cache the other warmed.
    const order = round % 2 ? ['aws', 'ours'] : ['ours', 'aws'];
    for (const tool of order) {
      if (tool === 'aws') {
        const r = await aws(fresh('aws-dest'));
        awsTimes.push(r.seconds);
        awsGets = r.gets;
      } else {
        const r = await ours(fresh('ours-root'));
        oursTimes.push(r.seconds);
        modelSteps.push(r.modelsStep);
        connections = r.connections;
        oursGets = r.gets;
      }
    }
  }
  const noop = await ours(path.join(work, 'ours-root'));
  if (!/0 downloaded \(0B\), 8 already in place/.test(noop.said))
    throw new Error(`the no-op restore downloaded:\n${noop.said}`);
  const awsNoop = await aws(path.join(work, 'aws-dest'));
  // A whole restore (config and models, no image) over the loopback sshd: its connections.
  const whole = await run(
    path.join(ROOT, 'restore-verda.mts'),
    ['--skip-image', '--root', fresh('whole-root')],
    restoreEnv,
  );

  const best = (xs: number[]) => Math.min(...xs);
  const all = (xs: number[]) => xs.map((t) => t.toFixed(1)).join(', ');
  const ratio = best(oursTimes) / best(awsTimes);
  const size = `${((MODELS.files * MODELS.size) / 1e9).toFixed(1)} GB in ${MODELS.files} files`;
  rows.push(
    '| case | restore-verda s | aws s3 sync s | ours / aws | goal | GETs (ours / aws) |',
    '|---|---:|---:|---:|---:|---|',
    `| ${size}, empty dir (best of ${ROUNDS}; all: ${all(oursTimes)} / ${all(awsTimes)}) ` +
      `| ${best(oursTimes).toFixed(2)} | ${best(awsTimes).toFixed(2)} ` +
      `| ${ratio.toFixed(2)} ${ratio <= 0.8 ? '✓' : '✗'} ` +
      `| ≤ 0.8 | ${oursGets} / ${awsGets} |`,
    `| ${size}, second (no-op) restore | ${noop.seconds.toFixed(2)} | ${awsNoop.seconds.toFixed(2)} ` +
      `| ${(noop.seconds / awsNoop.seconds).toFixed(2)} | — | ${noop.gets} / ${awsNoop.gets} |`,
  );
  console.log(
    `\nMeasured ${new Date().toISOString().slice(0, 10)} on ${os.cpus().length} × ${os.cpus()[0]?.model}, ` +
      `Node ${process.version}; ${version('aws', ['--version'])}; s3rver on loopback; Verda over a loopback sshd.\n`,
  );
  console.log(rows.join('\n'));
  console.log(`\nOf restore-verda's time, its models step: ${modelSteps.map((t) => t.toFixed(1)).join(', ')} s.`);
  console.log(
    `\nSSH connections: ${connections} per models restore, ${whole.connections} for a whole restore ` +
      `(config and models, ${whole.seconds.toFixed(1)} s).`,
  );
} finally {
  server.kill('SIGTERM');
  await sshd.stop();
  for (const d of ['aws-dest', 'ours-root', 'whole-root', 'verda', 'state', 'mello-backups']) {
    fs.rmSync(path.join(work, d), { recursive: true, force: true });
  }
}
