// Every R2 request ends, and ends right. Against a real S3 server (s3rver, taught what R2 does:
// see s3rver-fixes.ts) behind the fault proxy: a request that is never answered, or whose body
// the server stops reading, is abandoned after the idle timeout and retried, and a run where R2
// answers nothing ends by itself, naming the step; a body whose source fails or changes length
// abandons its request at once, leaving the previous object; a clock hours off is corrected and
// said, not reported as refused credentials; and the SDK never writes to the console.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import { FaultProxy, type Exchange, type Kind } from './fault-proxy.ts';
import {
  SECRET,
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
} from './helpers.ts';
import { setServerClock } from './s3rver-fixes.ts';
import { notices } from '../lib/cli.ts';
import { bucketTarget, loadConfig, type BucketKind } from '../lib/config.ts';
import { R2Backend } from '../lib/r2.ts';
import { SourceChanged, StorageError, type Source } from '../lib/storage.ts';

const BUCKET = 'comfy-multi-user-files';
const MiB = 1024 * 1024;
/** A run that takes longer than this is hung: it is killed and the test fails. */
const RUN_LIMIT_MS = 90_000;
/** Short limits, so a held request costs seconds: 1.5 s idle timeout, 50 ms first backoff. */
const LIMITS = { COMFYMULTI_R2_TIMEOUT: '1.5', COMFYMULTI_R2_BACKOFF: '0.05' };
const IDLE_MS = 1500;
/** What the SDK writes when left to itself: none of it may reach the run's output. */
const SDK_TEXT = /\[WARN\]|@smithy|@aws-sdk|WARN -/;

let s3: S3Server;
let proxy: FaultProxy;
let work: string;

test.before(async () => {
  s3 = await startS3([BUCKET]);
  proxy = await FaultProxy.start(s3.endpoint);
  work = tempDir('r2');
});

test.before.each(() => {
  proxy.clearFaults();
  setServerClock(0);
});

test.after(async () => {
  setServerClock(0);
  await proxy.close();
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// Shared

interface Run extends RunResult {
  ms: number;
}

/** Runs backup-mello; kills it (and fails the test) when it runs longer than RUN_LIMIT_MS. */
async function runMello(env: Record<string, string>, args: string[] = []): Promise<Run> {
  let timer: NodeJS.Timeout | undefined;
  const started = Date.now();
  const r = await runScript('backup-mello.mts', args, env, {
    onSpawn: (pid) => (timer = setTimeout(() => process.kill(pid, 'SIGKILL'), RUN_LIMIT_MS)),
  });
  clearTimeout(timer);
  const ms = Date.now() - started;
  if (r.signal === 'SIGKILL') assert.unreachable(`backup-mello hung: killed after ${ms} ms\n${out(r)}`);
  assert.not.match(r.stdout + r.stderr, SDK_TEXT, `no SDK line in the output\n${out(r)}`);
  assert.not.match(r.stdout + r.stderr, /\n\s+at .+:\d+/, 'no stack trace');
  return { ...r, ms };
}

/** A Mello data dir: small files, and a 40 MiB video sent as three parts (16, 16, 8 MiB). */
function melloData(name: string) {
  const root = path.join(work, name);
  const data = path.join(root, 'data');
  writeTree(data, {
    'user_data/user001/workflows/flow.json': '{"nodes":[1,2,3]}',
    'user_data/user002/comfy.settings.json': '{"theme":"dark"}',
    'inputs/shared/ref.png': crypto.randomBytes(300_000),
    'outputs/user001/img_0001.png': crypto.randomBytes(200_000),
  });
  writeRandomFile(path.join(data, VIDEO), 40 * MiB + 123);
  const env = (state = 'state') => ({
    R2_ENDPOINT: proxy.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    COMFYMULTI_STATE_DIR: path.join(root, state),
    MELLO_DATA_DIR: data,
    ...LIMITS,
  });
  return { data, env };
}

const VIDEO = 'outputs/user002/video.mp4';

/** Every file of the data dir is in the bucket, byte for byte, with its sha256. */
async function assertBackedUp(data: string) {
  setServerClock(0); // the test's own client reads with this machine's clock
  for (const tree of ['user_data', 'outputs', 'inputs']) {
    for (const [rel, digest] of Object.entries(treeDigest(path.join(data, tree)))) {
      const key = `${tree}/${rel}`;
      assert.is(sha256(await s3.readObject(BUCKET, key)), digest, `bytes of ${key}`);
      assert.is((await s3.headObject(BUCKET, key))?.metadata.sha256, digest, `sha256 metadata of ${key}`);
    }
  }
}

function assertClean(env: Record<string, string>) {
  assert.equal(s3.openUploads(BUCKET), [], 'no multipart upload left open');
  assert.not.ok(fs.existsSync(path.join(env.COMFYMULTI_STATE_DIR, 'backup-mello.lock')), 'the lock is released');
}

/** For each exchange the proxy held or stalled: the same request again, later, and answered. */
function assertRetriedAfterTimeout(from: number, kinds: Kind[]) {
  const same = (a: Exchange, b: Exchange) => a.kind === b.kind && a.url === b.url;
  for (const kind of kinds) {
    const held = proxy.of(kind, from).find((e) => e.outcome === 'held' || e.outcome === 'stalled');
    assert.ok(held, `a ${kind} request was held`);
    const retry = proxy.log.slice(held!.n).find((later) => same(later, held!) && later.outcome === 'forwarded');
    assert.ok(retry, `the held ${kind} request was sent again and answered`);
    assert.ok(retry!.status! < 300, `${kind} retry answered ${retry!.status}`);
    // Abandoned after the idle timeout, not sooner; and not much later either.
    const waited = retry!.at - held!.at;
    assert.ok(waited >= IDLE_MS - 100 && waited < IDLE_MS + 5_000, `${kind} retried ${waited} ms after it was sent`);
  }
}

const target = (endpoint: string) => ({ bucket: BUCKET, endpoint, accessKeyId: SECRET, secretAccessKey: SECRET });

/** Settles `p` within `ms` or fails the test (a request that hangs must not hang the test). */
async function settle<T>(p: Promise<T>, ms: number, what: string): Promise<{ value?: T; error?: unknown; ms: number }> {
  const started = Date.now();
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still pending after ${ms} ms`)), ms);
  });
  try {
    const value = await Promise.race([p, deadline]);
    return { value, ms: Date.now() - started };
  } catch (error) {
    if ((error as Error).message?.includes('still pending')) assert.unreachable((error as Error).message);
    return { error, ms: Date.now() - started };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A source of `bytes` whose streams behave as `fault` says once they reach `at` bytes from the
 * start of the source: `error` yields what comes before, waits a little (the bytes reach the
 * server) and errors with `error`; `end` ends there (the file shrank); `more` goes on past the
 * range's end (the file grew).
 */
function faultySource(bytes: Buffer, at: number, fault: { error: Error } | 'end' | 'more'): Source {
  return {
    size: bytes.length,
    describe: 'test source',
    open(start, end) {
      let pos = start;
      let grown = false;
      const stop = fault === 'more' ? end : Math.min(end, Math.max(start, at));
      const stream: Readable = new Readable({
        read() {
          if (pos < stop) {
            const n = Math.min(64 * 1024, stop - pos);
            this.push(bytes.subarray(pos, pos + n));
            pos += n;
          } else if (fault === 'more' && end === bytes.length && !grown) {
            grown = true;
            this.push(crypto.randomBytes(1000)); // past the end: bytes written since the file was hashed
          } else if (fault === 'more' || fault === 'end' || stop === end) {
            this.push(null);
          } else {
            setTimeout(() => stream.destroy(fault.error), 100);
          }
        },
      });
      return stream;
    },
  };
}

const bufferSource = (bytes: Buffer): Source => ({
  size: bytes.length,
  describe: 'buffer',
  open: (start, end) => Readable.from([bytes.subarray(start, end)]),
});

/** Parts of 5 MiB from 5 MiB on, so multipart uploads stay small here. */
const SMALL_PARTS = { multipartThreshold: 5 * MiB, partSize: 5 * MiB };

// ---------------------------------------------------------------------------------------------
// 1. Every request ends: held and stalled requests are retried after the idle timeout

test('one held request of each kind is abandoned after the idle timeout and retried; the run succeeds', async () => {
  const m = melloData('held-each');
  const first = await runMello(m.env());
  assert.is(first.code, 0, out(first));
  // A new state dir: every object is looked at again (HEAD). New bytes for the video (multipart)
  // and a new file (single PUT).
  writeRandomFile(path.join(m.data, VIDEO), 40 * MiB + 123);
  writeTree(m.data, { 'inputs/shared/new.png': crypto.randomBytes(50_000) });
  const from = proxy.log.length;
  proxy.hold(['list'], 1);
  proxy.hold(['head'], 1);
  proxy.hold(['put'], 1); // body read, never answered
  proxy.hold(['create-multipart'], 1);
  proxy.hold(['upload-part'], 1, 0, { readBody: false }); // body never read
  proxy.hold(['complete-multipart'], 1);
  const r = await runMello(m.env('state2'));
  assert.is(r.code, 0, out(r));
  assert.is(proxy.pendingFaults(), 0, 'every request was held once');
  assertRetriedAfterTimeout(from, ['list', 'head', 'put', 'create-multipart', 'upload-part', 'complete-multipart']);
  await assertBackedUp(m.data);
  assertClean(m.env('state2'));
});

test('bodies the server stops reading midway (a part, a PUT): retried after the idle timeout', async () => {
  const m = melloData('stalled');
  writeTree(m.data, { 'inputs/shared/big.png': crypto.randomBytes(4 * MiB) });
  const from = proxy.log.length;
  proxy.stall(['upload-part'], 5 * MiB);
  proxy.stall(['put'], 1 * MiB);
  const r = await runMello(m.env());
  assert.is(r.code, 0, out(r));
  assert.is(proxy.pendingFaults(), 0, 'both bodies stalled');
  const stalledPart = proxy.of('upload-part', from).find((e) => e.outcome === 'stalled')!;
  assert.is(stalledPart.bodyBytes, 5 * MiB, 'the part stalled 5 MiB in');
  assertRetriedAfterTimeout(from, ['upload-part', 'put']);
  await assertBackedUp(m.data);
  assertClean(m.env());
});

test('R2 answers nothing at all: exit 1 within bounded time naming each step, lock released', async () => {
  const m = melloData('silent');
  const from = proxy.log.length;
  const all: Kind[] = ['list', 'head', 'get', 'put', 'upload-part', 'create-multipart', 'complete-multipart'];
  all.push('abort-multipart', 'delete', 'other');
  proxy.hold(all, Infinity);
  const r = await runMello({ ...m.env(), COMFYMULTI_R2_ATTEMPTS: '3' });
  proxy.clearFaults();
  assert.is(r.code, 1, out(r));
  assert.ok(r.ms < 30_000, `ended by itself in ${r.ms} ms`);
  assert.match(r.stdout, /Backup FAILED/);
  for (const step of ['User data', 'Outputs', 'Inputs']) {
    assert.match(r.stdout, new RegExp(`Step \\d \\(${step}.*\\): .*did not answer.*after 3 attempts`), `names ${step}`);
  }
  assert.is(proxy.of('list', from).length, 9, 'three attempts per step, no more');
  assertClean(m.env());
});

test('every part and completion held: exit 1 in bounded time, the upload aborted, the older object whole', async () => {
  const m = melloData('parts-held');
  const first = await runMello(m.env());
  assert.is(first.code, 0, out(first));
  const before = fs.readFileSync(path.join(m.data, VIDEO));
  writeRandomFile(path.join(m.data, VIDEO), 40 * MiB + 123);
  const from = proxy.log.length;
  proxy.hold(['upload-part', 'complete-multipart'], Infinity, 0, { readBody: false });
  const r = await runMello({ ...m.env(), COMFYMULTI_R2_ATTEMPTS: '3' });
  proxy.clearFaults();
  assert.is(r.code, 1, out(r));
  assert.ok(r.ms < 30_000, `ended by itself in ${r.ms} ms`);
  assert.match(r.stdout, /Step \d \(Outputs\)/, 'the summary names the step');
  assert.match(r.stdout, VIDEO, 'and the file');
  assert.match(r.stdout, /did not answer/);
  const aborts = proxy.of('abort-multipart', from);
  assert.is(aborts.length, 1, 'the upload was aborted');
  assert.is(aborts[0].status, 204);
  assertClean(m.env());
  assert.is(sha256(await s3.readObject(BUCKET, VIDEO)), sha256(before), 'the older object is whole');
});

test('limits not in seconds, or attempts not a whole number from 1, are exit 2 naming the variable', async () => {
  const m = melloData('bad-limits');
  const bad: [string, string][] = [
    ['COMFYMULTI_R2_TIMEOUT', 'abc'],
    ['COMFYMULTI_R2_TIMEOUT', '0'],
    ['COMFYMULTI_R2_BACKOFF', '-1'],
    ['COMFYMULTI_R2_ATTEMPTS', '0'],
    ['COMFYMULTI_R2_ATTEMPTS', '2.5'],
    ['COMFYMULTI_SSH_TIMEOUT', '10s'],
    ['COMFYMULTI_COMMAND_TIMEOUT', '1e9'],
  ];
  const from = proxy.log.length;
  for (const [name, value] of bad) {
    const r = await runMello({ ...m.env(), [name]: value });
    assert.is(r.code, 2, `${name}=${value}\n${out(r)}`);
    assert.match(r.stderr, name);
    assert.is(r.stdout, '', 'nothing was done');
  }
  assert.is(proxy.log.length, from, 'no request sent');
  const limits = { COMFYMULTI_R2_TIMEOUT: '.5', COMFYMULTI_R2_BACKOFF: '0', COMFYMULTI_R2_ATTEMPTS: '3' };
  const fine = await runMello({ ...m.env(), ...limits }, ['--dry-run']);
  assert.is(fine.code, 0, out(fine));
});

// ---------------------------------------------------------------------------------------------
// 2. A body that fails abandons its request at once

test('a body erroring with SourceChanged: the PUT rejects with that error at once, the older object kept', async () => {
  const backend = new R2Backend(target(s3.endpoint), { idleTimeoutMs: 20_000, backoffMs: 50 });
  const key = 'body/single.bin';
  const older = crypto.randomBytes(700_000);
  await backend.put(key, bufferSource(older));
  const changed = new SourceChanged('test source changed while it was being sent');
  const bytes = crypto.randomBytes(700_000);
  const r = await settle(backend.put(key, faultySource(bytes, 300_000, { error: changed })), 10_000, 'the PUT');
  assert.is(r.error, changed, `rejects with the source's own error, got ${r.error}`);
  assert.ok(r.ms < 1_500, `at once (${r.ms} ms), not after the idle timeout`);
  assert.is(backend.pacer.attempts.put, 2, 'not retried');
  assert.ok((await s3.readObject(BUCKET, key)).equals(older), 'the older object is unchanged');
});

test('a part body erroring with SourceChanged: rejects with it at once, upload aborted, object kept', async () => {
  const backend = new R2Backend(target(s3.endpoint), { idleTimeoutMs: 20_000, backoffMs: 50, ...SMALL_PARTS });
  const key = 'body/multi.bin';
  const older = crypto.randomBytes(6 * MiB);
  await backend.put(key, bufferSource(older));
  const changed = new SourceChanged('test source changed while it was being sent');
  const bytes = crypto.randomBytes(12 * MiB);
  const r = await settle(backend.put(key, faultySource(bytes, 6 * MiB, { error: changed })), 10_000, 'the upload');
  assert.is(r.error, changed, `rejects with the source's own error, got ${r.error}`);
  assert.ok(r.ms < 1_500, `at once (${r.ms} ms), not after the idle timeout`);
  assert.is(backend.pacer.attempts['abort-multipart'], 1, 'the upload was aborted');
  assert.is(backend.pacer.attempts['complete-multipart'], 1, 'only the older object was completed');
  assert.equal(s3.openUploads(BUCKET), [], 'no multipart upload left open');
  assert.ok((await s3.readObject(BUCKET, key)).equals(older), 'the older object is unchanged');
});

test('a body shorter or longer than declared (the file shrank or grew) is a SourceChanged at once', async () => {
  const backend = new R2Backend(target(s3.endpoint), { idleTimeoutMs: 20_000, backoffMs: 50, ...SMALL_PARTS });
  const key = 'body/resized.bin';
  const older = crypto.randomBytes(100_000);
  await backend.put(key, bufferSource(older));
  const cases: [string, number, 'end' | 'more', RegExp][] = [
    ['shrank, single PUT', 700_000, 'end', /shrank/],
    ['grew, single PUT', 700_000, 'more', /grew/],
    ['shrank, in a part', 12 * MiB, 'end', /shrank/],
    ['grew, last part', 12 * MiB, 'more', /grew/],
  ];
  for (const [what, size, fault, message] of cases) {
    const bytes = crypto.randomBytes(size);
    const source = faultySource(bytes, fault === 'end' ? size - 1000 : size, fault);
    const r = await settle(backend.put(key, source), 10_000, what);
    assert.instance(r.error, SourceChanged, `${what}: ${r.error}`);
    assert.match((r.error as Error).message, message, what);
    assert.ok(r.ms < 1_500, `${what}: at once (${r.ms} ms)`);
    assert.ok((await s3.readObject(BUCKET, key)).equals(older), `${what}: the older object is unchanged`);
  }
  // A small file read whole, whose read came back short.
  const small: Source = { ...bufferSource(Buffer.alloc(1000)), readAll: async () => Buffer.alloc(999) };
  const r = await settle(backend.put(key, small), 5_000, 'the small PUT');
  assert.instance(r.error, SourceChanged);
  assert.equal(s3.openUploads(BUCKET), [], 'no multipart upload left open');
  assert.ok((await s3.readObject(BUCKET, key)).equals(older), 'the older object is unchanged');
});

// ---------------------------------------------------------------------------------------------
// 3. A clock hours off

test('the machine clock 3 hours behind R2: corrected at once, the run succeeds and says so', async () => {
  const m = melloData('clock');
  const from = proxy.log.length;
  setServerClock(3 * 3600_000);
  const r = await runMello(m.env(), ['--json']);
  setServerClock(0);
  assert.is(r.code, 0, out(r));
  assert.is(proxy.log[from].status, 403, 'the first request was refused for the clock');
  assert.match(r.stderr, /⚠ this machine's clock is 3h0m behind R2's: fix it \(timedatectl \/ chrony\)/, out(r));
  assert.not.match(r.stdout + r.stderr, /credentials/);
  const summary = JSON.parse(r.stdout);
  assert.is(summary.notices.length, 1, 'one notice in --json');
  assert.match(summary.notices[0], /3h0m behind/);
  await assertBackedUp(m.data);
  assertClean(m.env());
});

test('a clock R2 refuses and does not correct: the error says the clock, not the credentials', async () => {
  const backend = new R2Backend(target(s3.endpoint), { idleTimeoutMs: 20_000, backoffMs: 50 });
  setServerClock(-2 * 3600_000, { announce: false });
  // A listing: R2 says RequestTimeTooSkewed in its body (an answer to HEAD has none).
  const listing = (async () => {
    for await (const o of backend.list('')) void o;
  })();
  const r = await settle(listing, 10_000, 'the listing');
  setServerClock(0);
  assert.instance(r.error, StorageError);
  const message = (r.error as Error).message;
  assert.match(message, /clock is too far from R2's; fix it/);
  assert.not.match(message, /credentials/);
  assert.ok((r.error as StorageError).fatal, 'every other request would fail the same way');
  assert.is(backend.pacer.attempts.list, 2, 'sent again once, at once');
});

test('a clock 3 h off and a wrong secret: once the clock is corrected, the error names the credentials', async () => {
  const wrongSecret = { ...target(s3.endpoint), secretAccessKey: 'wrong' };
  const backend = new R2Backend(wrongSecret, { idleTimeoutMs: 20_000, backoffMs: 50 });
  setServerClock(3 * 3600_000);
  const listing = (async () => {
    for await (const o of backend.list('')) void o;
  })();
  const r = await settle(listing, 10_000, 'the listing');
  const head = await settle(backend.head('anything'), 10_000, 'the HEAD'); // no body: no code to tell
  setServerClock(0);
  for (const [what, error] of [
    ['list', r.error],
    ['head', head.error],
  ] as const) {
    assert.instance(error, StorageError, what);
    assert.match((error as Error).message, /refused the credentials \(403.*\): check R2_ACCESS_KEY_ID/, what);
    assert.not.match((error as Error).message, /clock/, what);
  }
  assert.is(backend.pacer.attempts.list, 2, 'refused for the clock, then for the signature');
  assert.is(backend.pacer.attempts.head, 1, 'signed on the corrected clock at once');
  assert.ok(
    [...notices].some((n) => /clock is 3h0m behind R2's/.test(n)),
    `the clock in the notices: ${[...notices]}`,
  );
});

// ---------------------------------------------------------------------------------------------
// 4. The SDK never writes to the console

test('the SDK warns of requests queueing for sockets: the warning is kept, nothing reaches the console', async () => {
  const backend = new R2Backend(target(proxy.endpoint), { idleTimeoutMs: 20_000, backoffMs: 50, maxSockets: 1 });
  const printed: string[] = [];
  const writes = [process.stdout, process.stderr].map((s) => [s, s.write] as const);
  const consoleWarn = console.warn;
  for (const [s] of writes) {
    s.write = ((chunk: string | Uint8Array) => (printed.push(String(chunk)), true)) as typeof s.write;
  }
  console.warn = (...args: unknown[]) => void printed.push(args.map(String).join(' '));
  try {
    // One socket, busy with a slow PUT, and three more waiting for it: the SDK's socket check
    // (at 2 s plus the connection timeout of 10 s) finds it at capacity. (The waiting requests
    // also reach their connection timeout, and are retried.)
    proxy.throttle(['put'], 64 * 1024);
    const puts = Array.from({ length: 4 }, (_, i) => {
      const bytes = crypto.randomBytes(1 * MiB);
      return backend.put(`queued/${i}.bin`, { ...bufferSource(bytes), describe: `queued ${i}` });
    });
    const warned = (async () => {
      while (!backend.sdkWarnings.some((w) => /socket usage/.test(w))) await new Promise((r) => setTimeout(r, 100));
    })();
    await settle(warned, 20_000, 'the SDK socket warning');
    proxy.throttle(['put'], undefined);
    await settle(Promise.all(puts), 30_000, 'the queued PUTs');
  } finally {
    for (const [s, write] of writes) s.write = write;
    console.warn = consoleWarn;
    proxy.clearFaults();
  }
  assert.match(backend.sdkWarnings.join('\n'), /socket usage at capacity/);
  assert.equal(
    printed.filter((p) => SDK_TEXT.test(p)),
    [],
    'nothing of the SDK printed',
  );
});

// ---------------------------------------------------------------------------------------------
// 5. Errors that name the variable in use (issue 20)

/** A backend for `kind` as the scripts make it: bucketTarget from loadConfig of `env`. */
function backendFor(kind: BucketKind, env: Record<string, string>) {
  const cfg = loadConfig({ HOME: work, ...env }, work);
  return new R2Backend(bucketTarget(cfg, kind), { idleTimeoutMs: 20_000, backoffMs: 50, attempts: 2 });
}

async function listError(backend: R2Backend): Promise<string> {
  const listing = (async () => {
    for await (const o of backend.list('')) void o;
  })();
  const r = await settle(listing, 10_000, 'the listing');
  assert.instance(r.error, StorageError);
  return (r.error as Error).message;
}

test('a refused per-bucket key names that pair, not R2_ACCESS_KEY_ID; the shared pair is named as such', async () => {
  const shared = { R2_ENDPOINT: s3.endpoint, R2_ACCESS_KEY_ID: SECRET, R2_SECRET_ACCESS_KEY: SECRET };
  const own = { R2_USER_FILES_ACCESS_KEY_ID: SECRET, R2_USER_FILES_SECRET_ACCESS_KEY: 'not-the-secret' };
  const wrongOwn = await listError(backendFor('userFiles', { ...shared, ...own }));
  assert.match(
    wrongOwn,
    /refused the credentials \(403 SignatureDoesNotMatch\): check R2_USER_FILES_ACCESS_KEY_ID and R2_USER_FILES_SECRET_ACCESS_KEY, the key pair in use for R2_USER_FILES_BUCKET/,
  );
  assert.not.match(wrongOwn, /R2_ACCESS_KEY_ID|R2_SECRET_ACCESS_KEY|not-the-secret/);
  // The versions bucket is signed with the user-files pair: its refusal names that pair too.
  const versions = await listError(backendFor('versions', { ...shared, ...own, R2_VERSIONS_BUCKET: BUCKET }));
  assert.match(
    versions,
    /check R2_USER_FILES_ACCESS_KEY_ID and R2_USER_FILES_SECRET_ACCESS_KEY, .* R2_VERSIONS_BUCKET/,
  );
  const wrongShared = await listError(backendFor('userFiles', { ...shared, R2_SECRET_ACCESS_KEY: 'nope' }));
  assert.match(wrongShared, /check R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY, the key pair in use/);
  const aws = { R2_ENDPOINT: s3.endpoint, AWS_ACCESS_KEY_ID: 'AKIA-NOT-A-KEY', AWS_SECRET_ACCESS_KEY: SECRET };
  const wrongAws = await listError(backendFor('userFiles', aws));
  assert.match(wrongAws, /\(403 InvalidAccessKeyId\): check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY/);
});

test('NoSuchBucket names the bucket variable, the endpoint in use and the EU jurisdiction endpoint', async () => {
  const env = { R2_ENDPOINT: s3.endpoint, R2_ACCESS_KEY_ID: SECRET, R2_SECRET_ACCESS_KEY: SECRET };
  const missing = await listError(backendFor('userFiles', { ...env, R2_USER_FILES_BUCKET: 'no-such-bucket' }));
  assert.match(missing, `R2 has no bucket no-such-bucket at ${s3.endpoint} (R2_ENDPOINT) (NoSuchBucket)`);
  assert.match(missing, 'check R2_USER_FILES_BUCKET');
  assert.match(
    missing,
    "an EU bucket needs its jurisdiction's endpoint, https://<account>.eu.r2.cloudflarestorage.com, in R2_USER_FILES_ENDPOINT",
  );
  // A bucket that exists at another endpoint: named by the variable the endpoint came from.
  const elsewhere = { ...env, R2_CACHE_ENDPOINT: s3.endpoint, R2_CACHE_BUCKET: 'comfy-multi-cache' };
  const cache = await listError(backendFor('cache', elsewhere));
  assert.match(cache, /\(R2_CACHE_ENDPOINT\) \(NoSuchBucket\): check R2_CACHE_BUCKET; .* in R2_CACHE_ENDPOINT/);
});

test('e2e: backup-mello with a wrong user-files key fails naming R2_USER_FILES_ACCESS_KEY_ID; a missing bucket names R2_USER_FILES_BUCKET', async () => {
  const m = melloData('named-variables');
  const env = { ...m.env(), R2_ENDPOINT: s3.endpoint };
  const wrongKey = await runMello({
    ...env,
    R2_USER_FILES_ACCESS_KEY_ID: SECRET,
    R2_USER_FILES_SECRET_ACCESS_KEY: 'not-the-secret',
  });
  assert.is(wrongKey.code, 1, out(wrongKey));
  assert.match(wrongKey.stdout, /check R2_USER_FILES_ACCESS_KEY_ID and R2_USER_FILES_SECRET_ACCESS_KEY/);
  assert.not.match(wrongKey.stdout + wrongKey.stderr, /check R2_ACCESS_KEY_ID|not-the-secret/);
  assertSaidOnce(wrongKey, /check R2_USER_FILES_ACCESS_KEY_ID/g);
  const noBucket = await runMello({ ...env, R2_USER_FILES_BUCKET: 'no-such-bucket' });
  assert.is(noBucket.code, 1, out(noBucket));
  assert.match(noBucket.stdout, /check R2_USER_FILES_BUCKET; an EU bucket needs .* in R2_USER_FILES_ENDPOINT/);
  assertSaidOnce(noBucket, /check R2_USER_FILES_BUCKET/g);
});

/** All three steps fail; the cause is said in full by step 1 (its line, the summary's); steps 2 and 3 point at it. */
function assertSaidOnce(r: Run, cause: RegExp) {
  assert.match(r.stdout, /3 failed/, out(r));
  assert.is(r.stdout.match(cause)?.length, 2, `the cause in full only on step 1's two lines\n${out(r)}`);
  for (const [n, tree] of [
    [2, 'outputs'],
    [3, 'inputs'],
  ])
    assert.match(
      r.stdout,
      new RegExp(`Step ${n} \\(\\w+\\): r2://[\\w-]+/${tree}/ list: same cause as step 1\n`),
      out(r),
    );
}

test('an upload of many parts at once prints no runtime warning (MaxListenersExceededWarning)', async () => {
  const warnings: string[] = [];
  const onWarning = (w: Error) => warnings.push(`${w.name}: ${w.message}`);
  process.on('warning', onWarning);
  try {
    const backend = new R2Backend(target(s3.endpoint), { ...SMALL_PARTS, partsInFlight: 24, maxPartsInFlight: 32 });
    const bytes = crypto.randomBytes(120 * MiB);
    const run = new AbortController();
    await backend.put('outputs/big/warning.bin', bufferSource(bytes), { signal: run.signal });
    await new Promise((r) => setTimeout(r, 50)); // a warning is emitted on the next tick
    assert.equal(warnings, []);
  } finally {
    process.off('warning', onWarning);
  }
});

test.run();
