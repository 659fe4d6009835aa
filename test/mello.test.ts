// backup-mello.mts against a real S3 server: byte for byte, sent once, never deleting.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import crypto from 'node:crypto';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { DeleteObjectCommand, PutObjectCommand } from '@aws-sdk/client-s3';
import {
  ROOT,
  hashCaches,
  runScript,
  s3Env,
  startS3,
  tempDir,
  treeDigest,
  sha256,
  writeRandomFile,
  writeHeldLock,
  writeTree,
  type S3Server,
} from './helpers.ts';

const BUCKET = 'comfy-multi-user-files';
const MiB = 1024 * 1024;
let s3: S3Server;
let work: string;
let data: string;
let env: Record<string, string>;

const ODD_NAMES = [
  'with space.json',
  `quote's "double".json`,
  '$(touch PWNED).json',
  '`touch PWNED2`.json',
  'new\nline.json',
  'ünïcödé 日本.json',
  '-dash-first.json',
];

test.before(async () => {
  s3 = await startS3([BUCKET]);
  work = tempDir('mello');
  data = path.join(work, 'data');
  env = { ...s3Env(s3, path.join(work, 'state')), MELLO_DATA_DIR: data };
  writeTree(data, {
    'user_data/user001/workflows/flow.json': '{"nodes":[1,2,3]}',
    'user_data/user001/comfy.settings.json': '{"theme":"dark"}',
    'user_data/user002/workflows/empty.json': '',
    'inputs/shared/ref.png': crypto.randomBytes(70_000),
    'outputs/user001/img_0001.png': crypto.randomBytes(300_000),
    'outputs/user002/img_0001.png': crypto.randomBytes(5000),
    ...Object.fromEntries(ODD_NAMES.map((n) => [`user_data/user003/${n}`, `content of ${n}`])),
  });
  // More than one listing page (1,000 keys).
  writeTree(data, Object.fromEntries(Array.from({ length: 1050 }, (_, i) => [`inputs/many/${i}.txt`, `input ${i}`])));
  // Larger than the multipart threshold: sent in 16 MiB parts.
  writeRandomFile(path.join(data, 'outputs/user002/video.mp4'), 40 * MiB + 123);
  // A symlink out of the tree must not be followed.
  fs.symlinkSync('/etc', path.join(data, 'outputs/user001/etc-link'));
  fs.symlinkSync('/etc/hostname', path.join(data, 'inputs/hostname-link'));
});

test.after(async () => {
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

async function assertBucketHolds(tree: string, prefix: string) {
  const local = treeDigest(path.join(data, tree));
  for (const [rel, digest] of Object.entries(local)) {
    const key = `${prefix}${rel}`;
    const body = await s3.readObject(BUCKET, key);
    assert.is(sha256(body), digest, `bytes of ${JSON.stringify(key)}`);
    const head = await s3.headObject(BUCKET, key);
    assert.is(head?.metadata.sha256, digest, `sha256 metadata of ${JSON.stringify(key)}`);
  }
  return Object.keys(local).length;
}

const json = (stdout: string) =>
  JSON.parse(stdout) as { steps: { status: string; data?: Record<string, any> }[]; exitCode: number };

test('a full run puts every file of user_data, outputs and inputs in the bucket byte for byte', async () => {
  const r = await runScript('backup-mello.mts', [], env);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /Step 1: /);
  let count = 0;
  for (const tree of ['user_data', 'outputs', 'inputs']) count += await assertBucketHolds(tree, `${tree}/`);
  const keys = await s3.listKeys(BUCKET);
  assert.is(keys.length, count, 'nothing but the files: no symlink followed');
  assert.not.ok(keys.some((k) => k.includes('etc-link') || k.includes('hostname-link')));
  assert.equal(s3.openUploads(BUCKET), [], 'no multipart upload left open');
  assert.ok(
    s3.bodyRequests().some((q) => q.url.includes('partNumber=3')),
    'the 40 MiB file went in parts',
  );
});

test('names with spaces, quotes, $(), newlines and non-ASCII survive and run nothing', async () => {
  for (const n of ODD_NAMES) {
    const body = await s3.readObject(BUCKET, `user_data/user003/${n}`);
    assert.is(body.toString(), `content of ${n}`);
  }
  for (const dir of [work, data, path.join(data, 'user_data/user003'), process.cwd(), '/tmp']) {
    assert.not.ok(fs.existsSync(path.join(dir, 'PWNED')), `nothing ran in ${dir}`);
    assert.not.ok(fs.existsSync(path.join(dir, 'PWNED2')));
  }
});

test('an unchanged rerun sends no object body, reads no file and lists only', async () => {
  const before = s3.requests.length;
  const r = await runScript('backup-mello.mts', ['--json'], env);
  assert.is(r.code, 0, r.stderr);
  const sent = s3.requests.slice(before);
  assert.equal(
    sent.filter((q) => q.method !== 'GET' || !q.url.includes('list-type=2')),
    [],
    'only listings',
  );
  // user_data/ and outputs/ fit a page each; inputs/ holds 1,051 keys: two pages.
  assert.is(sent.length, 4, `listing requests: ${sent.length}`);
  const summary = json(r.stdout);
  for (const step of summary.steps) {
    assert.is(step.data?.sent, 0);
    assert.is(step.data?.hashed, 0, 'no file hashed again');
  }
});

test('a file changed to new bytes of the same size is sent again, alone', async () => {
  const file = path.join(data, 'outputs/user001/img_0001.png');
  const size = fs.statSync(file).size;
  const fresh = crypto.randomBytes(size);
  fs.writeFileSync(file, fresh);
  const before = s3.requests.length;
  const r = await runScript('backup-mello.mts', ['--json'], env);
  assert.is(r.code, 0, r.stderr);
  const puts = s3.requests.slice(before).filter((q) => q.method === 'PUT');
  assert.is(puts.length, 1);
  assert.match(decodeURIComponent(puts[0].url), 'outputs/user001/img_0001.png');
  assert.ok((await s3.readObject(BUCKET, 'outputs/user001/img_0001.png')).equals(fresh));
  assert.is(json(r.stdout).steps[1].data?.hashed, 1, 'only the changed file was read');
});

/** Puts `file`'s mtime back to what `ref` holds, to the nanosecond (GNU touch -r), as a restore tool or `touch -r` would. */
function touchLike(ref: string, file: string) {
  assert.is(spawnSync('touch', ['-r', ref, file]).status, 0);
}

test('an edit that keeps the size and puts the mtime back is sent by the next run (the ctime tells)', async () => {
  const file = path.join(data, 'user_data/user001/workflows/flow.json');
  const ref = path.join(work, 'flow.json.times');
  fs.writeFileSync(ref, '');
  touchLike(file, ref);
  const before = fs.statSync(file, { bigint: true });
  const edited = Buffer.from('{"nodes":[9,8,7]}');
  assert.is(BigInt(edited.length), before.size);
  fs.writeFileSync(file, edited);
  touchLike(ref, file);
  const after = fs.statSync(file, { bigint: true });
  assert.is(after.mtimeNs, before.mtimeNs, 'the mtime is back');
  assert.is(after.ino, before.ino, 'the same inode');
  const r = await runScript('backup-mello.mts', ['--quick'], env);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.ok((await s3.readObject(BUCKET, 'user_data/user001/workflows/flow.json')).equals(edited), 'sent');
});

test('--quick leaves outputs alone', async () => {
  fs.writeFileSync(path.join(data, 'outputs/user001/img_0002.png'), 'new output');
  fs.writeFileSync(path.join(data, 'user_data/user001/workflows/flow2.json'), '{"new":true}');
  const r = await runScript('backup-mello.mts', ['--quick'], env);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, /skipped \(--quick\)/);
  assert.is(await s3.headObject(BUCKET, 'outputs/user001/img_0002.png'), undefined);
  assert.is((await s3.readObject(BUCKET, 'user_data/user001/workflows/flow2.json')).toString(), '{"new":true}');
});

test('--dry-run says what would be sent and where, and changes nothing', async () => {
  const cacheBefore = hashCaches(env.COMFYMULTI_STATE_DIR);
  assert.ok(Object.keys(cacheBefore).length >= 3, 'a hash cache per tree');
  const before = s3.requests.length;
  const r = await runScript('backup-mello.mts', ['--dry-run'], env);
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, `would send r2://${BUCKET}/outputs/user001/img_0002.png`);
  assert.equal(
    s3.requests.slice(before).filter((q) => q.method !== 'GET' && q.method !== 'HEAD'),
    [],
  );
  assert.is(await s3.headObject(BUCKET, 'outputs/user001/img_0002.png'), undefined);
  assert.equal(hashCaches(env.COMFYMULTI_STATE_DIR), cacheBefore, 'hash caches untouched');
});

test('a file deleted on Mello stays in R2', async () => {
  fs.rmSync(path.join(data, 'outputs/user002/img_0001.png'));
  const r = await runScript('backup-mello.mts', [], env);
  assert.is(r.code, 0, r.stderr);
  assert.ok(await s3.headObject(BUCKET, 'outputs/user002/img_0001.png'));
  assert.ok(await s3.headObject(BUCKET, 'outputs/user001/img_0002.png'), 'the new output is sent by a full run');
});

test('objects the bash scripts uploaded (no sha256 metadata) are adopted without sending', async () => {
  // Single-part: ETag is the plain MD5.
  const small = crypto.randomBytes(1000);
  writeTree(data, { 'inputs/legacy/small.bin': small });
  await s3.client.send(new PutObjectCommand({ Bucket: BUCKET, Key: 'inputs/legacy/small.bin', Body: small }));
  // Multipart with aws-cli's 8 MiB parts: the ETag is md5(part md5s)-N.
  const bigFile = path.join(data, 'inputs/legacy/big.bin');
  writeRandomFile(bigFile, 20 * MiB + 7);
  const key = 'inputs/legacy/big.bin';
  const multipartEtag = await s3.uploadLikeAwsCli(BUCKET, key, fs.readFileSync(bigFile));
  assert.is((await s3.headObject(BUCKET, key))?.etag, multipartEtag);

  const before = s3.requests.length;
  const r = await runScript('backup-mello.mts', ['--json'], env);
  assert.is(r.code, 0, r.stderr);
  assert.equal(
    s3.requests.slice(before).filter((q) => q.method === 'PUT'),
    [],
    'no body sent',
  );
  assert.is(json(r.stdout).steps[2].data?.adopted, 2);
  // Recorded: the next run needs no proof (no HEAD, no read).
  const before2 = s3.requests.length;
  const r2 = await runScript('backup-mello.mts', ['--json'], env);
  assert.is(r2.code, 0);
  assert.equal(
    s3.requests.slice(before2).filter((q) => q.method !== 'GET' || !q.url.includes('list-type')),
    [],
  );

  // A bash-era object whose bytes differ is replaced.
  writeTree(data, { 'inputs/legacy/stale.bin': 'new bytes' });
  await s3.client.send(new PutObjectCommand({ Bucket: BUCKET, Key: 'inputs/legacy/stale.bin', Body: 'old bytes' }));
  const r3 = await runScript('backup-mello.mts', ['--quick'], env);
  assert.is(r3.code, 0);
  assert.is((await s3.readObject(BUCKET, 'inputs/legacy/stale.bin')).toString(), 'new bytes');
});

test('--verify passes on a whole backup, names a deleted object, and --deep names altered bytes', async () => {
  const ok = await runScript('backup-mello.mts', ['--verify'], env);
  assert.is(ok.code, 0, ok.stdout + ok.stderr);
  assert.match(ok.stdout, /files in place/);
  const before = s3.requests.length;
  // Same size, other bytes, metadata untouched: only reading the bytes back can tell.
  const stored = path.join(s3.dir, BUCKET, 'user_data/user001/comfy.settings.json._S3rver_object');
  const original = fs.readFileSync(stored);
  fs.writeFileSync(stored, Buffer.alloc(original.length, 'x'));
  await s3.client.send(new DeleteObjectCommand({ Bucket: BUCKET, Key: 'inputs/shared/ref.png' }));
  const shallow = await runScript('backup-mello.mts', ['--verify'], env);
  assert.is(shallow.code, 1);
  assert.match(shallow.stdout, 'missing: r2://comfy-multi-user-files/inputs/shared/ref.png');
  assert.not.match(shallow.stdout, 'comfy.settings.json');
  const deep = await runScript('backup-mello.mts', ['--verify', '--deep'], env);
  assert.is(deep.code, 1);
  assert.match(deep.stdout, 'differs: r2://comfy-multi-user-files/user_data/user001/comfy.settings.json');
  assert.match(deep.stdout, 'missing: r2://comfy-multi-user-files/inputs/shared/ref.png');
  assert.equal(
    s3.requests.slice(before).filter((q) => q.method === 'PUT' || q.method === 'POST'),
    [],
    'verify changes nothing',
  );
  // Mend what the test broke: the next backup sends the deleted file again.
  fs.writeFileSync(stored, original);
  const again = await runScript('backup-mello.mts', [], env);
  assert.is(again.code, 0);
  assert.is((await runScript('backup-mello.mts', ['--verify', '--deep'], env)).code, 0);
});

test('--verify --deep hashes the sources again: a file edited behind its cache line is named', async () => {
  const rel = 'user001/workflows/flow.json';
  const file = path.join(data, 'user_data', rel);
  const ref = path.join(work, 'flow.json.times2');
  fs.writeFileSync(ref, '');
  touchLike(file, ref);
  const edited = Buffer.from('{"nodes":[0,0,0]}');
  assert.is(edited.length, fs.statSync(file).size);
  fs.writeFileSync(file, edited);
  touchLike(ref, file);
  // A cache line that vouches for the file as it is now (its stat, ctime included) with the old
  // sha256: what a damaged state directory, or an edit within the clock's tick, leaves behind.
  const cacheFile = path.join(env.COMFYMULTI_STATE_DIR, 'hashes-backup-mello-user_data.jsonl');
  const st = fs.statSync(file, { bigint: true });
  const lines = fs.readFileSync(cacheFile, 'utf8').trim().split('\n');
  const at = lines.findIndex((l) => JSON.parse(l).rel === rel);
  assert.ok(at >= 0, 'the file has a cache line');
  const line = JSON.parse(lines[at]);
  lines[at] = JSON.stringify({
    ...line,
    mtimeNs: String(st.mtimeNs),
    ctimeNs: String(st.ctimeNs),
    ino: String(st.ino),
  });
  fs.writeFileSync(cacheFile, lines.join('\n') + '\n');
  // The everyday --verify trusts the cache (that is what makes it cheap) ...
  const shallow = await runScript('backup-mello.mts', ['--verify'], env);
  assert.is(shallow.code, 0, 'the cache line is trusted: the test fools it as meant');
  // ... --deep trusts nothing.
  const deep = await runScript('backup-mello.mts', ['--verify', '--deep'], env);
  assert.is(deep.code, 1, deep.stdout + deep.stderr);
  assert.match(deep.stdout, `differs: r2://${BUCKET}/user_data/${rel}`);
  // Mended: without its cache, the next backup hashes and sends the file.
  fs.rmSync(cacheFile);
  assert.is((await runScript('backup-mello.mts', ['--quick'], env)).code, 0);
  assert.is((await runScript('backup-mello.mts', ['--verify', '--deep'], env)).code, 0);
});

/** Runs a script under script(1), which gives it a pseudo-terminal; resolves with what it showed. */
function onTerminal(extraEnv: Record<string, string>): Promise<{ code: number | null; screen: string }> {
  return new Promise((resolve) => {
    const child = spawn('script', ['-qec', path.join(ROOT, 'backup-mello.mts'), '/dev/null'], {
      env: { ...process.env, ...env, TERM: 'xterm', ...extraEnv },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let screen = '';
    child.stdout.on('data', (d) => (screen += d));
    child.on('close', (code) => resolve({ code, screen }));
  });
}

test('progress with rate and ETA on a terminal only; none with NO_COLOR or into a pipe', async () => {
  const file = path.join(data, 'outputs/user009/progress.bin');
  writeRandomFile(file, 24 * MiB);
  const { NO_COLOR: _, ...withoutNoColor } = process.env;
  process.env = withoutNoColor; // the test runner sets NO_COLOR for everything else
  const tty = await onTerminal({});
  assert.is(tty.code, 0, tty.screen);
  assert.match(tty.screen, /\r\x1b\[2K {2}outputs\/ sent: .*\/s, ETA \d+:\d\d/);
  assert.match(tty.screen, /\x1b\[32m/, 'colour on a terminal');
  fs.writeFileSync(file, crypto.randomBytes(24 * MiB));
  const noColor = await onTerminal({ NO_COLOR: '1' });
  assert.is(noColor.code, 0);
  assert.match(noColor.screen, /1 sent/);
  assert.not.match(noColor.screen, /ETA|\x1b\[/);
  fs.writeFileSync(file, crypto.randomBytes(24 * MiB));
  const piped = await runScript('backup-mello.mts', [], env);
  assert.match(piped.stdout, /1 sent/);
  assert.not.match(piped.stdout, /ETA|\x1b\[|\r/);
});

test('an unknown flag is exit 2 naming it, with no stack trace', async () => {
  const r = await runScript('backup-mello.mts', ['--qiuck'], env);
  assert.is(r.code, 2);
  assert.match(r.stderr, '--qiuck');
  assert.not.match(r.stderr + r.stdout, /\n\s+at /);
  const r2 = await runScript('backup-mello.mts', ['--quick', '--full'], env);
  assert.is(r2.code, 2);
  assert.match(r2.stderr, '--quick and --full');
});

test('missing credentials are exit 2 naming the variable, before any request', async () => {
  const before = s3.requests.length;
  const { R2_SECRET_ACCESS_KEY: _, ...noSecret } = env;
  const r = await runScript('backup-mello.mts', [], noSecret);
  assert.is(r.code, 2);
  assert.match(r.stderr, 'R2_SECRET_ACCESS_KEY');
  const { R2_ENDPOINT: __, ...noEndpoint } = env;
  const r2 = await runScript('backup-mello.mts', [], noEndpoint);
  assert.is(r2.code, 2);
  assert.match(r2.stderr, 'R2_ENDPOINT');
  assert.is(s3.requests.length, before);
});

test('credentials never appear in output, even verbose, as JSON, or when refused', async () => {
  const secret = 'wr0ng-Secret-Key-That-Must-Not-Leak';
  const r = await runScript('backup-mello.mts', ['--verbose'], {
    ...env,
    R2_ACCESS_KEY_ID: 'AKIA-leak-check',
    R2_SECRET_ACCESS_KEY: secret,
  });
  assert.is(r.code, 1);
  assert.match(r.stdout, /refused the credentials/);
  assert.not.match(r.stdout + r.stderr, /\n\s+at /, 'no stack trace');
  assert.not.ok((r.stdout + r.stderr).includes(secret));
  for (const args of [['--verbose'], ['--json'], ['--dry-run', '-v']]) {
    const ok = await runScript('backup-mello.mts', args, env);
    assert.is(ok.code, 0);
    assert.not.ok((ok.stdout + ok.stderr).includes(env.R2_SECRET_ACCESS_KEY), `secret in output of ${args}`);
  }
});

test('.env beside the script or --env-file configures; the environment wins', async () => {
  const envFile = path.join(work, 'alt.env');
  fs.writeFileSync(
    envFile,
    [
      `R2_ENDPOINT=${s3.endpoint}`,
      'R2_ACCESS_KEY_ID=S3RVER',
      `R2_SECRET_ACCESS_KEY="S3RVER"`,
      `MELLO_DATA_DIR=${data}`,
      '# comment',
      '',
    ].join('\n'),
  );
  const r = await runScript('backup-mello.mts', ['--env-file', envFile, '--quick'], {
    COMFYMULTI_STATE_DIR: env.COMFYMULTI_STATE_DIR,
  });
  assert.is(r.code, 0, r.stderr);
  const r2 = await runScript('backup-mello.mts', ['--env-file', envFile], {
    COMFYMULTI_STATE_DIR: env.COMFYMULTI_STATE_DIR,
    MELLO_DATA_DIR: '/nonexistent',
  });
  assert.is(r2.code, 2);
  assert.match(r2.stderr, 'MELLO_DATA_DIR');
  const r3 = await runScript('backup-mello.mts', ['--env-file', path.join(work, 'missing.env')], env);
  assert.is(r3.code, 2);
  assert.match(r3.stderr, 'missing.env');
});

test('a second run while one holds the lock exits 75 at once; a stale lock is taken over', async () => {
  const lock = path.join(env.COMFYMULTI_STATE_DIR, 'backup-mello.lock');
  writeHeldLock(lock, 'backup-mello'); // a live holder: this test process, as its record says
  const started = Date.now();
  const r = await runScript('backup-mello.mts', [], env);
  assert.is(r.code, 75);
  assert.match(r.stderr, 'lock');
  assert.ok(Date.now() - started < 10_000);
  assert.ok(fs.existsSync(lock), 'the holder keeps its lock');
  fs.writeFileSync(lock, '999999999\n'); // no such process
  const r2 = await runScript('backup-mello.mts', ['--quick'], env);
  assert.is(r2.code, 0, r2.stderr);
  assert.not.ok(fs.existsSync(lock), 'released after the run');
});

test.run();
