// Nothing lost under faults. Real processes, a real S3 server (s3rver, taught what R2 does and it
// lacks: aborting multipart uploads, checking signatures; see s3rver-fixes.ts) behind a
// fault-injecting proxy (fault-proxy.ts), a real sshd, a real tmpfs. After every fault: no partial
// file under a final name, no multipart upload left open at the server, the lock released, older
// backups not rotated away, and the next run completes. Transient faults are retried and the run
// succeeds; the others end with exit 1 naming the step.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { FaultProxy, type Exchange } from './fault-proxy.ts';
import {
  ROOT,
  SECRET,
  hashCaches,
  runScript,
  sha256,
  startS3,
  tempDir,
  treeDigest,
  writeRandomFile,
  writeTree,
  type RunResult,
  type S3Server,
  out,
  until,
} from './helpers.ts';
import { startSshd, type Sshd } from './sshd.ts';
import { makeVerda, type VerdaFixture } from './verda-fixture.ts';

const USER_FILES = 'comfy-multi-user-files';
const CACHE = 'comfy-multi-cache';
const MODELS = 'comfy-multi-model-vault-backup';
const MiB = 1024 * 1024;
/** The longest any single run may take here before the test calls it hung (a loaded 2-core machine). */
const RUN_LIMIT_MS = 120_000;

let s3: S3Server;
let proxy: FaultProxy;
let sshd: Sshd;
let work: string;

test.before(async () => {
  s3 = await startS3([USER_FILES, CACHE, MODELS]);
  proxy = await FaultProxy.start(s3.endpoint);
  sshd = await startSshd(['verda']);
  work = tempDir('faults');
});

// A fault a failed test left set must not leak into the next one.
test.before.each(() => proxy.clearFaults());

test.after(async () => {
  await proxy.close();
  await s3.stop();
  await sshd.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// Shared checks

interface Run extends RunResult {
  pid: number;
  ms: number;
}

/** Runs a script; kills it (and fails the test) if it runs longer than `limitMs`: a hang is a bug. */
async function run(
  script: string,
  args: string[],
  env: Record<string, string>,
  opts: { onSpawn?: (pid: number) => void; limitMs?: number } = {},
): Promise<Run> {
  let pid = 0;
  let timer: NodeJS.Timeout | undefined;
  const started = Date.now();
  const r = await runScript(script, args, env, {
    onSpawn: (p) => {
      pid = p;
      timer = setTimeout(() => process.kill(p, 'SIGKILL'), opts.limitMs ?? RUN_LIMIT_MS);
      opts.onSpawn?.(p);
    },
  });
  clearTimeout(timer);
  const ms = Date.now() - started;
  if (r.signal === 'SIGKILL')
    assert.unreachable(`${script} ${args.join(' ')} hung: killed after ${ms} ms\n${r.stdout}\n${r.stderr}`);
  return { ...r, pid, ms };
}

function assertNoStack(r: RunResult) {
  assert.not.match(r.stdout + r.stderr, /\n\s+at .+:\d+/, 'no stack trace');
}

/** Temporary names left anywhere under dir (`.NAME.partial-PID`, a bundle's `.verda-config-backup-T`). */
function leftovers(dir: string): string[] {
  const found: string[] = [];
  const visit = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) visit(path.join(d, e.name));
      else if (/\.partial-\d+|^\.verda-config-backup-/.test(e.name)) found.push(path.join(d, e.name));
    }
  };
  if (fs.existsSync(dir)) visit(dir);
  return found;
}

/** What every run must leave behind, whatever happened to it. */
function assertCleanAfter(script: string, stateDir: string, dirs: string[] = []) {
  for (const bucket of [USER_FILES, CACHE, MODELS])
    assert.equal(s3.openUploads(bucket), [], `no multipart upload left open in ${bucket}`);
  assert.not.ok(fs.existsSync(path.join(stateDir, `${script}.lock`)), 'the lock is released');
  for (const d of [stateDir, ...dirs]) assert.equal(leftovers(d), [], `no temporary file left in ${d}`);
}

function s3Creds(stateDir: string): Record<string, string> {
  return {
    R2_ENDPOINT: proxy.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    COMFYMULTI_STATE_DIR: stateDir,
  };
}

async function assertObject(bucket: string, key: string, file: string | Buffer) {
  const want = sha256(typeof file === 'string' ? fs.readFileSync(file) : file);
  const body = await s3.readObject(bucket, key);
  assert.is(sha256(body), want, `bytes of ${bucket}/${key}`);
  assert.is((await s3.headObject(bucket, key))?.metadata.sha256, want, `sha256 metadata of ${bucket}/${key}`);
}

/** Every file of the Mello data dir is in the bucket, byte for byte. */
async function assertMelloBackedUp(data: string) {
  for (const tree of ['user_data', 'outputs', 'inputs']) {
    if (!fs.existsSync(path.join(data, tree))) continue;
    for (const rel of Object.keys(treeDigest(path.join(data, tree))))
      await assertObject(USER_FILES, `${tree}/${rel}`, path.join(data, tree, rel));
  }
}

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

// ---------------------------------------------------------------------------------------------
// backup-mello against R2 faults

const mello = (() => {
  let data = '';
  let env: Record<string, string> = {};
  return {
    get data() {
      return data;
    },
    get env() {
      return env;
    },
    get state() {
      return env.COMFYMULTI_STATE_DIR;
    },
    setup() {
      const root = path.join(work, 'mello');
      data = path.join(root, 'data');
      env = { ...s3Creds(path.join(root, 'state')), MELLO_DATA_DIR: data };
      writeTree(data, {
        'user_data/user001/workflows/flow.json': '{"nodes":[1,2,3]}',
        'user_data/user002/comfy.settings.json': '{"theme":"dark"}',
        'inputs/shared/ref.png': crypto.randomBytes(300_000),
        'outputs/user001/img_0001.png': crypto.randomBytes(200_000),
      });
      // Three parts of 16, 16 and 8 MiB.
      writeRandomFile(path.join(data, 'outputs/user002/video.mp4'), 40 * MiB + 123);
    },
  };
})();

const VIDEO = 'outputs/user002/video.mp4';

/** The Mello data dir, backed up whole (so each test may also run alone, with test.only). */
async function ensureMello() {
  if (mello.data) return;
  mello.setup();
  const r = await run('backup-mello.mts', [], mello.env);
  assert.is(r.code, 0, out(r));
}

test('R2: the connection cut in the middle of a part, and of a single PUT, is retried and the run succeeds', async () => {
  mello.setup();
  const from = proxy.log.length;
  proxy.cut(['upload-part'], 5 * MiB, 1); // the second part request dies 5 MiB in
  proxy.cut(['put'], 100_000); // the first single PUT with a body dies 100 kB in
  const r = await run('backup-mello.mts', [], mello.env);
  assert.is(r.code, 0, out(r));
  assert.is(proxy.pendingFaults(), 0, 'both cuts happened');
  const cutPart = proxy.of('upload-part', from).find((e) => e.outcome === 'cut')!;
  assert.ok(
    cutPart.bodyBytes >= 5 * MiB && cutPart.bodyBytes < 16 * MiB,
    `cut mid-part after ${cutPart.bodyBytes} bytes`,
  );
  const again = proxy
    .of('upload-part', from)
    .filter((e) => e.uploadId === cutPart.uploadId && e.partNumber === cutPart.partNumber && e.status === 200);
  assert.is(again.length, 1, 'the cut part was sent again, once');
  const cutPut = proxy.of('put', from).find((e) => e.outcome === 'cut')!;
  assert.ok(
    proxy.of('put', from).some((e) => e.key === cutPut.key && e.status === 200),
    'the cut PUT was sent again',
  );
  await assertMelloBackedUp(mello.data);
  assertCleanAfter('backup-mello', mello.state);
});

test('R2: 500 and 503 answers to every kind of request are retried with backoff and the run succeeds', async () => {
  await ensureMello();
  writeRandomFile(path.join(mello.data, VIDEO), 40 * MiB + 123); // new bytes: multipart again
  writeTree(mello.data, { 'inputs/shared/new.png': crypto.randomBytes(50_000) });
  const from = proxy.log.length;
  proxy.fail(['list'], 1, 500);
  proxy.fail(['create-multipart'], 1, 503);
  proxy.fail(['upload-part'], 2, 503);
  proxy.fail(['complete-multipart'], 1, 500);
  proxy.fail(['put'], 1, 503);
  const r = await run('backup-mello.mts', [], mello.env);
  assert.is(r.code, 0, out(r));
  assert.is(proxy.pendingFaults(), 0, 'every fault was met');
  const injected = proxy.log.slice(from).filter((e) => e.outcome === 'injected');
  assert.is(injected.length, 6);
  const same = (a: Exchange, b: Exchange) => a.kind === b.kind && a.url === b.url;
  for (const e of injected) {
    const retry = proxy.log.slice(e.n).find((later) => same(later, e));
    assert.ok(retry, `${e.kind} ${e.key} was retried`);
    // Backoff starts at 500 ms with ±25% jitter: never sooner than 375 ms after the failure.
    assert.ok(retry!.at - e.at >= 350, `${e.kind} retried after ${retry!.at - e.at} ms: no backoff`);
  }
  await assertMelloBackedUp(mello.data);
  assertCleanAfter('backup-mello', mello.state);
});

test('R2: a multipart completion whose answer is lost: the retry finds no upload, the object is whole, the run succeeds', async () => {
  await ensureMello();
  writeRandomFile(path.join(mello.data, VIDEO), 40 * MiB + 123);
  const from = proxy.log.length;
  proxy.loseAnswer(['complete-multipart']);
  const r = await run('backup-mello.mts', [], mello.env);
  assert.is(r.code, 0, out(r));
  assert.is(proxy.pendingFaults(), 0, 'the answer was lost');
  const completes = proxy.of('complete-multipart', from);
  assert.is(completes.length, 2, 'completed, then retried');
  assert.is(completes[0].outcome, 'cut');
  assert.is(completes[1].status, 404, 'the retry finds the upload gone (NoSuchUpload)');
  await assertMelloBackedUp(mello.data);
  assertCleanAfter('backup-mello', mello.state);
});

test('R2: 503 on every part: exit 1 naming the step after bounded attempts, upload aborted, the older object whole', async () => {
  await ensureMello();
  const before = fs.readFileSync(path.join(mello.data, VIDEO)); // what R2 holds now
  writeRandomFile(path.join(mello.data, VIDEO), 40 * MiB + 123);
  writeTree(mello.data, { 'inputs/shared/later.png': crypto.randomBytes(20_000) });
  const from = proxy.log.length;
  proxy.fail(['upload-part'], Infinity, 503);
  const r = await run('backup-mello.mts', [], mello.env);
  proxy.clearFaults();
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /Backup FAILED/);
  assert.match(r.stdout, /Step \d+ \(Outputs\)/, 'the summary names the step');
  assert.match(r.stdout, VIDEO, 'and the file');
  assert.match(r.stdout, /503/);
  assert.match(r.stdout, /after 5 attempts/);
  assertNoStack(r);
  const parts = proxy.of('upload-part', from);
  const perPart = new Map<number, number>();
  for (const p of parts) perPart.set(p.partNumber!, (perPart.get(p.partNumber!) ?? 0) + 1);
  assert.ok(Math.max(...perPart.values()) === 5, `5 attempts per part at most, got ${[...perPart.entries()]}`);
  const aborts = proxy.of('abort-multipart', from);
  assert.is(aborts.length, 1, 'the upload was aborted');
  assert.is(aborts[0].status, 204);
  assert.is(proxy.of('complete-multipart', from).length, 0);
  assertCleanAfter('backup-mello', mello.state);
  await assertObject(USER_FILES, VIDEO, before); // the older copy in R2, whole
  // The other steps still ran.
  await assertObject(USER_FILES, 'inputs/shared/later.png', path.join(mello.data, 'inputs/shared/later.png'));

  const again = await run('backup-mello.mts', [], mello.env);
  assert.is(again.code, 0, out(again));
  await assertMelloBackedUp(mello.data);
  assertCleanAfter('backup-mello', mello.state);
});

/** Starts a run, waits until its part bodies are flowing (slowly), sends `signal`, and returns the run. */
async function interrupt(signal: NodeJS.Signals, env: Record<string, string>, uploads: number): Promise<Run> {
  const from = proxy.log.length;
  proxy.throttle(['upload-part'], 512 * 1024);
  let pid = 0;
  const running = run('backup-mello.mts', [], env, { onSpawn: (p) => (pid = p) });
  const flowing = () => {
    const moving = proxy.of('upload-part', from).filter((e) => e.bodyBytes > 256 * 1024);
    return new Set(moving.map((e) => e.uploadId)).size >= uploads;
  };
  await proxy.waitFor(flowing, 60_000, `part bodies of ${uploads} uploads in flight`);
  process.kill(pid, signal);
  const r = await running;
  proxy.clearFaults();
  return r;
}

test('SIGINT in the middle of two multipart uploads: exit 1, both aborted, nothing stored, lock released; the rerun completes', async () => {
  await ensureMello();
  writeRandomFile(path.join(mello.data, 'outputs/user003/a.mp4'), 24 * MiB);
  writeRandomFile(path.join(mello.data, 'outputs/user003/b.mp4'), 24 * MiB + 1);
  const from = proxy.log.length;
  // The server answers the second abort with a 503: the script must retry it before it exits.
  proxy.fail(['abort-multipart'], 1, 503, 1);
  const r = await interrupt('SIGINT', mello.env, 2);
  assert.is(r.code, 1, out(r));
  assert.match(r.stderr, /SIGINT received/);
  assert.match(r.stdout, /interrupted by SIGINT/);
  assertNoStack(r);
  assert.is(proxy.pendingFaults(), 0, 'the 503 was given');
  const uploads = new Set(proxy.of('upload-part', from).map((e) => e.uploadId));
  assert.is(uploads.size, 2);
  const aborted = new Set(
    proxy
      .of('abort-multipart', from)
      .filter((a) => a.status === 204)
      .map((a) => a.uploadId),
  );
  assert.equal(
    [...aborted].sort(),
    [...uploads].sort(),
    `both uploads aborted: ${proxy.of('abort-multipart', from).map((a) => `${a.status} ${a.outcome}`)}`,
  );
  assert.is(proxy.of('complete-multipart', from).length, 0);
  assertCleanAfter('backup-mello', mello.state);
  for (const key of ['outputs/user003/a.mp4', 'outputs/user003/b.mp4'])
    assert.is(await s3.headObject(USER_FILES, key), undefined, `no ${key}`);

  const again = await run('backup-mello.mts', [], mello.env);
  assert.is(again.code, 0, out(again));
  await assertMelloBackedUp(mello.data);
  assertCleanAfter('backup-mello', mello.state);
});

test('SIGTERM in the middle of a multipart upload replacing an object: exit 1, aborted, the older object whole; the rerun completes', async () => {
  await ensureMello();
  const before = fs.readFileSync(path.join(mello.data, VIDEO));
  writeRandomFile(path.join(mello.data, VIDEO), 40 * MiB + 123);
  const from = proxy.log.length;
  const r = await interrupt('SIGTERM', mello.env, 1);
  assert.is(r.code, 1, out(r));
  assert.match(r.stderr, /SIGTERM received/);
  assert.match(r.stdout, /interrupted by SIGTERM/);
  assert.is(proxy.of('abort-multipart', from).length, 1);
  assertCleanAfter('backup-mello', mello.state);
  await assertObject(USER_FILES, VIDEO, before);

  const again = await run('backup-mello.mts', [], mello.env);
  assert.is(again.code, 0, out(again));
  await assertMelloBackedUp(mello.data);
  assertCleanAfter('backup-mello', mello.state);
});

test('two runs at once: the second exits 75 at once and changes nothing', async () => {
  await ensureMello();
  writeRandomFile(path.join(mello.data, VIDEO), 40 * MiB + 123);
  const from = proxy.log.length;
  proxy.throttle(['upload-part'], 1 * MiB);
  let pid = 0;
  const first = run('backup-mello.mts', [], mello.env, { onSpawn: (p) => (pid = p) });
  await proxy.waitFor(
    () => proxy.of('upload-part', from).some((e) => e.bodyBytes > 0),
    60_000,
    'the first run sending',
  );
  const lock = path.join(mello.state, 'backup-mello.lock');
  const cacheBefore = hashCaches(mello.state);
  // The second run talks to its own (counting) proxy: any request it made would show there.
  const witness = await FaultProxy.start(s3.endpoint);
  try {
    const second = await run('backup-mello.mts', [], { ...mello.env, R2_ENDPOINT: witness.endpoint });
    assert.is(second.code, 75, out(second));
    assert.match(second.stderr, 'lock');
    assert.match(second.stderr, String(pid), 'names the holder');
    assert.is(second.stdout, '', 'no step started');
    assert.ok(second.ms < 15_000, `exits at once (${second.ms} ms)`);
    assert.is(witness.log.length, 0, 'the second run sent no request');
    assert.ok(alive(pid), 'the first run goes on');
    assert.is(JSON.parse(fs.readFileSync(lock, 'utf8')).pid, pid, 'the lock is still the first run’s');
    assert.equal(hashCaches(mello.state), cacheBefore, 'the hash caches untouched');
  } finally {
    await witness.close();
    proxy.clearFaults();
  }
  const r = await first;
  assert.is(r.code, 0, out(r));
  await assertMelloBackedUp(mello.data);
  assertCleanAfter('backup-mello', mello.state);
});

// ---------------------------------------------------------------------------------------------
// backup-verda: the SSH link, Mello's disk, R2 under the config bundle

interface VerdaSetup {
  fixture: VerdaFixture;
  backupDir: string;
  state: string;
  env: Record<string, string>;
}

function verdaSetup(name: string, backupDir?: string): VerdaSetup {
  const root = path.join(work, name);
  const fixture = makeVerda(path.join(root, 'verda'));
  const dir = backupDir ?? path.join(root, 'mello/backups/verda');
  const state = path.join(root, 'state');
  return {
    fixture,
    backupDir: dir,
    state,
    env: {
      ...s3Creds(state),
      ...fixture.env,
      VERDA_HOST: 'verda',
      SSH_CONFIG: sshd.config,
      BACKUP_DIR: dir,
      KEEP_BACKUPS: '1',
    },
  };
}

/** name → sha256 of every file in a backup dir. */
function listing(dir: string): Record<string, string> {
  return Object.fromEntries(
    fs
      .readdirSync(dir)
      .filter((n) => fs.statSync(path.join(dir, n)).isFile())
      .map((n) => [n, sha256(fs.readFileSync(path.join(dir, n)))]),
  );
}

/** The R2 side of backup-verda: the latest bundle's bytes and the dated copies. */
async function bundleState() {
  return {
    latest: sha256(await s3.readObject(CACHE, 'verda-config-backup.tar.gz')),
    dated: await s3.listKeys(CACHE, 'verda-config-backups/'),
  };
}

function newestManifest(dir: string) {
  const names = fs
    .readdirSync(dir)
    .filter((n) => /^manifest-\d{8}-\d{6}\.json$/.test(n))
    .sort();
  return {
    name: names[names.length - 1],
    ...JSON.parse(fs.readFileSync(path.join(dir, names[names.length - 1]), 'utf8')),
  };
}

/** After a failed run: every file of the earlier good run still there, unchanged; the R2 bundle and its dated copies as they were. */
async function assertOlderBackupsKept(
  dir: string,
  before: Record<string, string>,
  r2Before: Awaited<ReturnType<typeof bundleState>>,
) {
  const now = listing(dir);
  for (const [name, digest] of Object.entries(before))
    assert.is(now[name], digest, `${name} of the earlier run kept, unchanged`);
  assert.equal(await bundleState(), r2Before, 'R2 keeps the previous bundle and every dated copy');
}

/** Resolves once a temporary file for `kind` in dir has grown to `bytes`; returns its name. */
async function partialGrown(dir: string, kind: string, bytes: number, timeoutMs: number): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    for (const name of fs.existsSync(dir) ? fs.readdirSync(dir) : []) {
      if (!name.startsWith(`.${kind}-`) || !/\.partial-\d+-[0-9a-f]{8}$/.test(name)) continue;
      const size = fs.statSync(path.join(dir, name), { throwIfNoEntry: false })?.size ?? 0;
      if (size >= bytes) return name;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`no ${kind} temporary file of ${bytes} bytes in ${dir} within ${timeoutMs} ms`);
}

const wait = (ms: number) => new Promise((r) => setTimeout(r, ms)); // a new run timestamp

/** A good --quick run, then a second one, returned while its home-dev (32 MiB) streams in. */
async function verdaMidTransfer(name: string, grownBytes: number) {
  const v = verdaSetup(name);
  const good = await run('backup-verda.mts', ['--quick'], v.env);
  assert.is(good.code, 0, out(good));
  const before = listing(v.backupDir);
  const r2Before = await bundleState();
  await wait(1100);
  // A home that takes a moment to stream: 32 MiB that gzip cannot shrink.
  writeRandomFile(path.join(v.fixture.home, 'big/blob.bin'), 32 * MiB);
  let pid = 0;
  const running = run('backup-verda.mts', ['--quick'], v.env, { onSpawn: (p) => (pid = p) });
  const partial = await partialGrown(v.backupDir, 'home-dev', grownBytes, 60_000);
  return { v, before, r2Before, running, pid, partial };
}

test('SSH link cut in the middle of an artifact transfer: exit 1 naming the step, no partial file, older backups kept; the next run completes', async () => {
  const { v, before, r2Before, running, pid, partial } = await verdaMidTransfer('ssh-cut', 4 * MiB);
  const sessions = sshd.sessions();
  assert.ok(sessions.length > 0, 'the run has an SSH connection to cut');
  for (const s of sessions) process.kill(s, 'SIGKILL');
  const r = await running;
  assert.ok(pid > 0);
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /Backup FAILED/);
  assert.match(r.stdout, /Step \d+ \(Home directory \(dev\)\)/, 'the summary names the step');
  assertNoStack(r);
  assert.not.ok(fs.existsSync(path.join(v.backupDir, partial)), 'the temporary file is gone');
  const m = newestManifest(v.backupDir);
  assert.is(m.complete, false, 'the manifest of the failed run says so');
  assert.ok(m.failedSteps.includes('Home directory (dev)'), `failed steps: ${m.failedSteps}`);
  assert.not.ok(
    m.artifacts.some((a: { name: string }) => a.name.startsWith('home-dev-')),
    'no home-dev artifact recorded for the failed run',
  );
  assert.equal(
    fs.readdirSync(v.backupDir).filter((n) => n.startsWith('home-dev-')),
    Object.keys(before).filter((n) => n.startsWith('home-dev-')),
    'no home-dev file but the earlier one',
  );
  await assertOlderBackupsKept(v.backupDir, before, r2Before);
  assertCleanAfter('backup-verda', v.state, [v.backupDir]);

  await wait(1100);
  const again = await run('backup-verda.mts', ['--quick'], v.env);
  assert.is(again.code, 0, out(again));
  assert.is(newestManifest(v.backupDir).complete, true);
  const home = fs.readdirSync(v.backupDir).filter((n) => n.startsWith('home-dev-'));
  assert.is(home.length, 1, 'rotated after the good run (KEEP_BACKUPS=1)');
  const names = spawnSync('tar', ['-tzf', path.join(v.backupDir, home[0])], {
    encoding: 'utf8',
    maxBuffer: 64 * MiB,
  }).stdout;
  assert.ok(names.split('\n').includes('./big/blob.bin'), 'the new home-dev holds the big file');
  assertCleanAfter('backup-verda', v.state, [v.backupDir]);
});

test('Mello disk full while writing an artifact: exit 1 naming the step, no partial file, older artifacts kept; the next run completes', async () => {
  const mount = path.join(work, 'tmpfs');
  fs.mkdirSync(mount, { recursive: true });
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', mount], { encoding: 'utf8' });
  assert.is(m.status, 0, `mount a 1 MiB tmpfs: ${m.stderr}`);
  try {
    const v = verdaSetup('disk-full', path.join(mount, 'verda'));
    const good = await run('backup-verda.mts', ['--quick'], v.env);
    assert.is(good.code, 0, out(good));
    const before = listing(v.backupDir);
    const r2Before = await bundleState();
    await wait(1100);
    writeRandomFile(path.join(v.fixture.home, 'big/blob.bin'), 8 * MiB); // the home-dev archive cannot fit

    const r = await run('backup-verda.mts', ['--quick'], v.env);
    assert.is(r.code, 1, out(r));
    assert.match(
      r.stdout,
      /Step \d+ \(Home directory \(dev\)\): .*ENOSPC/,
      'the summary names the step and the disk full',
    );
    assertNoStack(r);
    assert.not.ok(
      fs.readdirSync(v.backupDir).some((n) => n.startsWith('home-dev-') && !(n in before)),
      'no new home-dev file',
    );
    await assertOlderBackupsKept(v.backupDir, before, r2Before);
    assertCleanAfter('backup-verda', v.state, [v.backupDir]);
    const man = newestManifest(v.backupDir);
    assert.is(man.complete, false);
    assert.ok(man.failedSteps.includes('Home directory (dev)'));

    // The admin makes room; the next run completes.
    const grow = spawnSync('mount', ['-o', 'remount,size=64m', mount], { encoding: 'utf8' });
    assert.is(grow.status, 0, grow.stderr);
    await wait(1100);
    const again = await run('backup-verda.mts', ['--quick'], v.env);
    assert.is(again.code, 0, out(again));
    assert.is(newestManifest(v.backupDir).complete, true);
    assertCleanAfter('backup-verda', v.state, [v.backupDir]);
  } finally {
    spawnSync('umount', [mount]);
  }
});

test('SIGTERM while an artifact streams in from Verda: exit 1, no partial file, older backups kept, lock released; the next run completes', async () => {
  const { v, before, r2Before, running, pid, partial } = await verdaMidTransfer('verda-sigterm', 2 * MiB);
  process.kill(pid, 'SIGTERM');
  const r = await running;
  assert.is(r.code, 1, out(r));
  assert.match(r.stderr, /SIGTERM received/);
  assert.match(r.stdout, /Step \d+ \(Home directory \(dev\)\): interrupted/);
  assertNoStack(r);
  assert.not.ok(fs.existsSync(path.join(v.backupDir, partial)));
  await assertOlderBackupsKept(v.backupDir, before, r2Before);
  assertCleanAfter('backup-verda', v.state, [v.backupDir]);
  await until(() => sshd.sessions().length === 0, 10_000, 'the SSH connection closed with the run');

  fs.rmSync(path.join(v.fixture.home, 'big'), { recursive: true });
  await wait(1100);
  const again = await run('backup-verda.mts', ['--quick'], v.env);
  assert.is(again.code, 0, out(again));
  assertCleanAfter('backup-verda', v.state, [v.backupDir]);
});

test('R2 answering 503 to every upload of the config bundle: exit 1 naming the step, local artifacts written, nothing rotated, the previous bundle stands; the next run completes', async () => {
  const v = verdaSetup('verda-r2-down');
  const good = await run('backup-verda.mts', ['--quick'], v.env);
  assert.is(good.code, 0, out(good));
  const before = listing(v.backupDir);
  const r2Before = await bundleState();
  await wait(1100);
  const from = proxy.log.length;
  proxy.fail(['put', 'create-multipart', 'upload-part'], Infinity, 503);
  const r = await run('backup-verda.mts', ['--quick'], v.env);
  proxy.clearFaults();
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /Step \d+ \(Config bundle to R2\): .*503.*after 5 attempts/);
  assertNoStack(r);
  const puts = proxy.of('put', from);
  assert.is(puts.length, 5, 'five attempts, then the step gives up');
  for (let i = 1; i < puts.length; i++) {
    assert.ok(
      puts[i].at - puts[i - 1].at >= 350 * 2 ** (i - 1),
      `attempt ${i + 1} came ${puts[i].at - puts[i - 1].at} ms after the one before: backoff`,
    );
  }
  const m = newestManifest(v.backupDir);
  assert.is(m.complete, false);
  assert.equal(m.failedSteps, ['Config bundle to R2']);
  for (const a of m.artifacts as { name: string; sha256: string }[]) {
    assert.is(sha256(fs.readFileSync(path.join(v.backupDir, a.name))), a.sha256, `${a.name} written whole`);
  }
  await assertOlderBackupsKept(v.backupDir, before, r2Before);
  assertCleanAfter('backup-verda', v.state, [v.backupDir]);

  await wait(1100);
  const again = await run('backup-verda.mts', ['--quick'], v.env);
  assert.is(again.code, 0, out(again));
  const after = await bundleState();
  assert.is.not(after.latest, r2Before.latest, 'a new bundle');
  assert.is(after.dated.length, 1, 'rotated to KEEP_BACKUPS=1 after the good run');
  assertCleanAfter('backup-verda', v.state, [v.backupDir]);
});

// ---------------------------------------------------------------------------------------------
// Bad input: exit 2 naming the flag or variable (1 for what only the server can tell), nothing done

/** A run that must be refused before anything was done: no request, no SSH connection, no lock, no state. */
async function refused(script: string, args: string[], env: Record<string, string>, names: string | RegExp) {
  const from = proxy.log.length;
  const connections = sshd.connections();
  const r = await run(script, args, env);
  assert.is(r.code, 2, `${script} ${args.join(' ')}: ${out(r)}`);
  assert.match(r.stderr, names);
  assertNoStack(r);
  assert.is(r.stdout, '', 'no step line');
  assert.is(proxy.log.length, from, 'no request to R2');
  assert.is(sshd.connections(), connections, 'no SSH connection');
  return r;
}

function badInputEnv(name: string) {
  const root = path.join(work, name);
  const data = path.join(root, 'data');
  writeTree(data, { 'user_data/user001/a.json': '{}', 'inputs/x.png': 'x', 'outputs/user001/o.png': 'o' });
  const backupDir = path.join(root, 'backups');
  const state = path.join(root, 'state');
  const fixture = makeVerda(path.join(root, 'verda'));
  return {
    root,
    data,
    backupDir,
    state,
    fixture,
    mello: { ...s3Creds(state), MELLO_DATA_DIR: data },
    verda: { ...s3Creds(state), ...fixture.env, VERDA_HOST: 'verda', SSH_CONFIG: sshd.config, BACKUP_DIR: backupDir },
    /** Nothing was written: no state dir (lock, hash cache), no backup dir. */
    assertUntouched() {
      assert.not.ok(fs.existsSync(state), 'no state written');
      assert.not.ok(fs.existsSync(backupDir), 'no backup dir made');
    },
  };
}

test('bad input: unknown flags and stray arguments are exit 2 naming them', async () => {
  const b = badInputEnv('bad-flags');
  for (const [args, names] of [
    [['--qiuck'], '--qiuck'],
    [['-x'], '-x'],
    [['--dry-run', '--fast'], '--fast'],
    [['now'], 'now'],
    [['--env-file'], '--env-file'],
  ] as [string[], string][]) {
    await refused('backup-mello.mts', args, b.mello, names);
    await refused('backup-verda.mts', args, b.verda, names);
  }
  b.assertUntouched();
});

test('bad input: conflicting flags are exit 2 naming both', async () => {
  const b = badInputEnv('bad-conflict');
  const other = path.join(b.root, 'other.env');
  fs.writeFileSync(other, '');
  for (const [args, names] of [
    [['--quick', '--full'], /--quick and --full/],
    [['--full', '--quick'], /--quick and --full/],
    [['--dry-run', '--verify'], /--verify and --dry-run/],
    [['--env-file', other, '--env-file', other], /--env-file given more than once/],
  ] as [string[], RegExp][]) {
    await refused('backup-mello.mts', args, b.mello, names);
    await refused('backup-verda.mts', args, b.verda, names);
  }
  b.assertUntouched();
});

test('bad input: KEEP_BACKUPS of 0 or not a whole number is exit 2 naming it', async () => {
  const b = badInputEnv('bad-keep');
  for (const keep of ['0', '00', 'ten', '-1', '2.5', '3 ', '1e3', '0x10']) {
    const r = await refused('backup-verda.mts', ['--quick'], { ...b.verda, KEEP_BACKUPS: keep }, 'KEEP_BACKUPS');
    assert.ok(r.stderr.includes(`"${keep}"`), `the value is quoted back: ${r.stderr}`);
    await refused('backup-mello.mts', [], { ...b.mello, KEEP_BACKUPS: keep }, 'KEEP_BACKUPS');
  }
  // And from an --env-file the same.
  const envFile = path.join(b.root, 'keep.env');
  fs.writeFileSync(envFile, 'KEEP_BACKUPS=0\n');
  await refused('backup-verda.mts', ['--quick', '--env-file', envFile], b.verda, 'KEEP_BACKUPS');
  b.assertUntouched();
});

test('bad input: an --env-file that cannot be read is exit 2 naming it and why', async () => {
  const b = badInputEnv('bad-envfile');
  const missing = path.join(b.root, 'missing.env');
  await refused('backup-mello.mts', ['--env-file', missing], b.mello, new RegExp(`${missing}.*ENOENT`));
  await refused('backup-verda.mts', ['--quick', '--env-file', missing], b.verda, new RegExp(`${missing}.*ENOENT`));
  await refused('backup-mello.mts', ['--env-file', b.root], b.mello, new RegExp(`${b.root}.*EISDIR`));
  const garbled = path.join(b.root, 'garbled.env');
  fs.writeFileSync(garbled, 'R2_ENDPOINT=http://x\nthis is not a setting\n');
  await refused('backup-mello.mts', ['--env-file', garbled], b.mello, `${garbled}:2`);
  // A file the admin's user may not read (root reads everything, so the run is as nobody).
  const secret = path.join(b.root, 'root-only.env');
  fs.writeFileSync(secret, 'R2_SECRET_ACCESS_KEY=s3cr3t\n', { mode: 0o600 });
  fs.chmodSync(b.root, 0o755);
  fs.chmodSync(work, 0o755);
  const r = spawnSync(path.join(ROOT, 'backup-mello.mts'), ['--env-file', secret], {
    uid: 65534,
    gid: 65534,
    cwd: '/',
    env: {
      PATH: process.env.PATH,
      HOME: '/nonexistent',
      ...b.mello,
      COMFYMULTI_STATE_DIR: path.join(b.root, 'nobody-state'),
    },
    encoding: 'utf8',
    timeout: RUN_LIMIT_MS,
  });
  assert.is(r.status, 2, `as nobody: ${r.stdout}${r.stderr}`);
  assert.match(r.stderr, new RegExp(`${secret}.*EACCES`));
  assert.not.ok((r.stdout + r.stderr).includes('s3cr3t'));
  b.assertUntouched();
});

test('bad input: an endpoint that is not an http(s) URL is exit 2 naming the variable', async () => {
  const b = badInputEnv('bad-endpoint');
  for (const endpoint of ['not a url', 'r2.example.com', 'http://', 'ftp://r2.example.com', 'file:///etc/passwd']) {
    await refused('backup-mello.mts', [], { ...b.mello, R2_ENDPOINT: endpoint }, 'R2_ENDPOINT');
    await refused('backup-verda.mts', ['--quick'], { ...b.verda, R2_ENDPOINT: endpoint }, 'R2_ENDPOINT');
  }
  await refused(
    'backup-mello.mts',
    [],
    { ...b.mello, R2_USER_FILES_ENDPOINT: 'eu.r2 example' },
    'R2_USER_FILES_ENDPOINT',
  );
  await refused('backup-verda.mts', ['--quick'], { ...b.verda, R2_CACHE_ENDPOINT: '::' }, 'R2_CACHE_ENDPOINT');
  b.assertUntouched();
});

test('bad input: wrong credentials are exit 1 with the server’s 403 said plainly, nothing sent, nothing left open', async () => {
  const b = badInputEnv('bad-credentials');
  writeRandomFile(path.join(b.data, 'outputs/user001/big.mp4'), 20 * MiB);
  const wrongSecret = 'Wr0ng-Secret-Not-To-Be-Printed';
  for (const [creds, code] of [
    [{ R2_ACCESS_KEY_ID: 'AKIA-NOT-A-KEY' }, 'InvalidAccessKeyId'],
    [{ R2_SECRET_ACCESS_KEY: wrongSecret }, 'SignatureDoesNotMatch'],
  ] as [Record<string, string>, string][]) {
    const from = proxy.log.length;
    const r = await run('backup-mello.mts', [], { ...b.mello, ...creds });
    assert.is(r.code, 1, out(r));
    assert.match(
      r.stdout,
      new RegExp(`R2 refused the credentials \\(403 ${code}\\): check R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY`),
    );
    assert.match(r.stdout, /Step \d+ \(User data \(workflows, settings\)\): .*refused the credentials/);
    assertNoStack(r);
    assert.not.ok((r.stdout + r.stderr).includes(wrongSecret), 'the secret is never printed');
    const sent = proxy.log.slice(from);
    assert.ok(sent.length > 0 && sent.every((e) => e.status === 403), 'every answer was the 403');
    assert.ok(
      sent.every((e) => e.kind === 'list'),
      `no object request after the refusal: ${sent.map((e) => e.kind)}`,
    );
    assertCleanAfter('backup-mello', b.state);
  }
  assert.equal(await s3.listKeys(USER_FILES, 'outputs/user001/big'), []);
});

test('bad input: a source directory that does not exist', async () => {
  const b = badInputEnv('bad-source');
  // Mello's data dir: a configuration error.
  await refused(
    'backup-mello.mts',
    [],
    { ...b.mello, MELLO_DATA_DIR: path.join(b.root, 'no-such-data') },
    new RegExp(`MELLO_DATA_DIR.*no-such-data`),
  );
  b.assertUntouched();
  // One of its trees: a warning and a skipped row, the others sent.
  fs.rmSync(path.join(b.data, 'outputs'), { recursive: true });
  const r = await run('backup-mello.mts', [], b.mello);
  assert.is(r.code, 0, out(r));
  assert.match(r.stdout, new RegExp(`${path.join(b.data, 'outputs')} does not exist`));
  await assertObject(USER_FILES, 'inputs/x.png', path.join(b.data, 'inputs/x.png'));
  // A source directory missing on Verda: a warning and a skipped row, not a failure (SPEC).
  const v = await run('backup-verda.mts', ['--quick'], {
    ...b.verda,
    VERDA_PROJECT_DIR: path.join(b.root, 'no-such-project'),
  });
  assert.is(v.code, 0, out(v));
  assert.match(v.stdout, /Step \d+: Project \.env\n(.*\n)*? *– nothing to archive/);
  assert.match(v.stdout, /no-such-project: none of \.env exists/);
  assert.not.ok(
    fs.readdirSync(b.backupDir).some((n) => n.startsWith('project-env-') || n.startsWith('comfy-project-')),
  );
  assertCleanAfter('backup-verda', b.state, [b.backupDir]);
});

test.run();
