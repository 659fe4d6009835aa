// restore-mello.mts against a real S3 server (s3rver, behind the fault proxy): Mello's users'
// files lost and brought back byte for byte, one user, one tree elsewhere, newer files kept,
// nothing deleted, cut and interrupted downloads, odd names, and the drill.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { HeadObjectCommand } from '@aws-sdk/client-s3';
import { TreeCache } from '../lib/hash-cache.ts';
import { downloadTree } from '../lib/download.ts';
import { bufferSource } from './backend-conformance.ts';
import { FaultProxy } from './fault-proxy.ts';
import { MemoryBackend } from './memory-backend.ts';
import {
  hashCaches,
  out,
  runScript,
  s3Env,
  sha256,
  startS3,
  tempDir,
  treeDigest,
  writeRandomFile,
  writeTree,
  type RunResult,
  type S3Server,
} from './helpers.ts';

const BUCKET = 'comfy-multi-user-files';
const MiB = 1024 * 1024;
const VIDEO = 'outputs/user002/video.mp4';
let s3: S3Server;
let proxy: FaultProxy;
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

/** What backup-mello put in R2, as Mello held it: relative path → sha256 (symlinks are not sent). */
let backedUp: Record<string, string>;

test.before(async () => {
  s3 = await startS3([BUCKET]);
  proxy = await FaultProxy.start(s3.endpoint);
  work = tempDir('restore-mello');
  data = path.join(work, 'data');
  env = {
    ...s3Env(s3, path.join(work, 'state')),
    R2_ENDPOINT: proxy.endpoint,
    MELLO_DATA_DIR: data,
    COMFYMULTI_R2_ATTEMPTS: '3',
    COMFYMULTI_R2_BACKOFF: '0.05',
    COMFYMULTI_R2_TIMEOUT: '5',
  };
  writeTree(data, {
    'user_data/user001/workflows/flow.json': '{"nodes":[1,2,3]}',
    'user_data/user001/comfy.settings.json': '{"theme":"dark"}',
    'user_data/user002/workflows/empty.json': '',
    'user_data/user002/workflows/mine.json': '{"user":2}',
    'inputs/shared/ref.png': crypto.randomBytes(70_000),
    'outputs/user001/img_0001.png': crypto.randomBytes(300_000),
    'outputs/user002/img_0001.png': crypto.randomBytes(5000),
    ...Object.fromEntries(ODD_NAMES.map((n) => [`user_data/user003/${n}`, `content of ${n}`])),
  });
  // Three ranged GETs of 8 MiB.
  writeRandomFile(path.join(data, VIDEO), 20 * MiB + 123);
  fs.symlinkSync('/etc', path.join(data, 'outputs/user001/etc-link'));
  const r = await runScript('backup-mello.mts', [], env);
  assert.is(r.code, 0, out(r));
  backedUp = treeDigest(data);
  assert.ok(Object.keys(backedUp).length >= 15);
});

test.after(async () => {
  await proxy.close();
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

const restore = (args: string[], extra: Record<string, string> = {}) =>
  runScript('restore-mello.mts', args, { ...env, ...extra }, { limitMs: 60_000 });

interface Summary {
  exitCode: number;
  steps: { name: string; status: string; summary?: string; data?: Record<string, any> }[];
  notices: string[];
}
const json = (r: RunResult) => JSON.parse(r.stdout) as Summary;

/** Temporary download files (`.name.partial-PID-xxxx`) anywhere under dir. */
function partials(dir: string): string[] {
  const found: string[] = [];
  const visit = (d: string) => {
    for (const e of fs.existsSync(d) ? fs.readdirSync(d, { withFileTypes: true }) : []) {
      if (e.isDirectory()) visit(path.join(d, e.name));
      else if (/\.partial-\d+-[0-9a-f]{8}$/.test(e.name)) found.push(path.join(d, e.name));
    }
  };
  visit(dir);
  return found;
}

/** The digest of a subtree, keyed as treeDigest(data) keys it. */
const digestOf = (root: string, prefix: string) =>
  Object.fromEntries(Object.entries(treeDigest(root)).map(([rel, d]) => [`${prefix}${rel}`, d]));
const only = (digest: Record<string, string>, keep: (rel: string) => boolean) =>
  Object.fromEntries(Object.entries(digest).filter(([rel]) => keep(rel)));

test("Mello's data lost: every file comes back byte for byte; the next backup and restore read nothing", async () => {
  fs.rmSync(data, { recursive: true, force: true });
  const r = await restore(['--json']);
  assert.is(r.code, 0, out(r));
  assert.equal(treeDigest(data), backedUp, 'the trees are identical');
  assert.equal(partials(data), []);
  const steps = json(r).steps;
  assert.equal(
    steps.map((s) => s.status),
    ['ok', 'ok', 'ok'],
  );
  assert.is(
    steps.reduce((n, s) => n + s.data!.downloaded, 0),
    Object.keys(backedUp).length,
  );
  // A restored file carries its object's time, as `aws s3 sync` sets it.
  const head = await s3.client.send(new HeadObjectCommand({ Bucket: BUCKET, Key: 'inputs/shared/ref.png' }));
  const mtime = fs.statSync(path.join(data, 'inputs/shared/ref.png')).mtimeMs;
  assert.ok(Math.abs(mtime - head.LastModified!.getTime()) < 1000, `mtime ${mtime} vs ${head.LastModified}`);
  // The restore wrote backup-mello's hash caches: its next run reads no file and sends nothing.
  const b = await runScript('backup-mello.mts', ['--json'], env);
  assert.is(b.code, 0, out(b));
  for (const step of json(b).steps) {
    assert.is(step.data?.sent, 0, step.name);
    assert.is(step.data?.hashed, 0, `${step.name}: no file hashed again`);
  }
  const again = await restore(['--json']);
  assert.is(again.code, 0, out(again));
  for (const step of json(again).steps) {
    assert.is(step.data?.downloaded, 0, step.name);
    assert.is(step.data?.hashed, 0, `${step.name}: no file hashed again`);
  }
});

test('names with spaces, quotes, $(), newlines and non-ASCII come back and run nothing', async () => {
  for (const n of ODD_NAMES) {
    assert.is(fs.readFileSync(path.join(data, 'user_data/user003', n), 'utf8'), `content of ${n}`);
  }
  for (const dir of [work, data, path.join(data, 'user_data/user003'), process.cwd(), '/tmp']) {
    assert.not.ok(fs.existsSync(path.join(dir, 'PWNED')), `nothing ran in ${dir}`);
    assert.not.ok(fs.existsSync(path.join(dir, 'PWNED2')));
  }
});

test("--user restores that user's user_data/ and outputs/ alone; nothing is deleted", async () => {
  fs.rmSync(path.join(data, 'user_data/user002'), { recursive: true });
  fs.rmSync(path.join(data, 'outputs/user002'), { recursive: true });
  fs.rmSync(path.join(data, 'user_data/user001/comfy.settings.json'));
  fs.writeFileSync(path.join(data, 'user_data/user002-notes.txt'), 'never backed up');
  const r = await restore(['--user', 'user002']);
  assert.is(r.code, 0, out(r));
  assert.match(r.stdout, /Step 3: Inputs\n\s+– skipped \(--user\)/);
  const user002 = (rel: string) => rel.startsWith('user_data/user002/') || rel.startsWith('outputs/user002/');
  assert.equal(only(treeDigest(data), user002), only(backedUp, user002));
  assert.not.ok(fs.existsSync(path.join(data, 'user_data/user001/comfy.settings.json')), "another user's file");
  assert.is(fs.readFileSync(path.join(data, 'user_data/user002-notes.txt'), 'utf8'), 'never backed up', 'not deleted');
  const all = await restore([]);
  assert.is(all.code, 0, out(all));
  assert.ok(fs.existsSync(path.join(data, 'user_data/user001/comfy.settings.json')));
  assert.ok(fs.existsSync(path.join(data, 'user_data/user002-notes.txt')), 'a file R2 does not hold stays');
  fs.rmSync(path.join(data, 'user_data/user002-notes.txt'));
});

test('--only user_data --to DIR: that tree into DIR, as under MELLO_DATA_DIR; the backup caches untouched', async () => {
  const to = path.join(work, 'elsewhere');
  const caches = hashCaches(env.COMFYMULTI_STATE_DIR);
  const r = await restore(['--only', 'user_data', '--to', to]);
  assert.is(r.code, 0, out(r));
  assert.equal(
    digestOf(path.join(to, 'user_data'), 'user_data/'),
    only(backedUp, (rel) => rel.startsWith('user_data/')),
  );
  assert.equal(fs.readdirSync(to), ['user_data'], 'no other tree');
  assert.equal(hashCaches(env.COMFYMULTI_STATE_DIR), caches, "backup-mello's caches describe MELLO_DATA_DIR only");
  fs.rmSync(to, { recursive: true });
});

test('a file newer here than its object is kept without --overwrite (said in the summary), replaced with it', async () => {
  const newer = path.join(data, 'user_data/user001/workflows/flow.json');
  const older = path.join(data, 'outputs/user001/img_0001.png');
  fs.writeFileSync(newer, '{"edited":"after the last backup"}');
  fs.writeFileSync(older, 'stale bytes from an old copy');
  fs.utimesSync(older, new Date('2001-01-01'), new Date('2001-01-01'));
  const dry = await restore(['--dry-run']);
  assert.is(dry.code, 0, out(dry));
  assert.match(dry.stdout, /would keep .*flow\.json: newer here than/);
  assert.match(dry.stdout, /would download .*img_0001\.png.*changed/);
  assert.is(fs.readFileSync(older, 'utf8'), 'stale bytes from an old copy', '--dry-run changes nothing');

  const r = await restore([]);
  assert.is(r.code, 0, out(r));
  assert.is(fs.readFileSync(newer, 'utf8'), '{"edited":"after the last backup"}', 'kept');
  assert.is(sha256(fs.readFileSync(older)), backedUp['outputs/user001/img_0001.png'], 'an older copy is replaced');
  assert.match(r.stdout, /1 kept: newer here than their object/);
  const summary = r.stdout.slice(r.stdout.indexOf('=== Restore complete'));
  assert.match(summary, /user_data\/: 1 file not restored, kept as it is: newer here than their object/);

  const o = await restore(['--overwrite']);
  assert.is(o.code, 0, out(o));
  assert.is(sha256(fs.readFileSync(newer)), backedUp['user_data/user001/workflows/flow.json'], 'replaced');
  assert.not.match(o.stdout, /kept/);
});

test('a body cut midway is resumed from where it stopped', async () => {
  const file = path.join(data, VIDEO);
  fs.rmSync(file);
  const from = proxy.log.length;
  proxy.cutAnswer(['get'], 3 * MiB);
  const r = await restore([]);
  assert.is(r.code, 0, out(r));
  assert.is(proxy.pendingFaults(), 0, 'the cut happened');
  assert.is(sha256(fs.readFileSync(file)), backedUp[VIDEO]);
  const gets = proxy.of('get', from).filter((e) => e.key === VIDEO);
  assert.is(gets.length, 4, gets.map((e) => e.range).join(', '));
  const starts = gets.map((e) => Number(/bytes=(\d+)-/.exec(e.range ?? '')?.[1]));
  assert.ok(
    starts.some((s) => s > 0 && s % (8 * MiB) !== 0),
    `a range asked again from where it was cut: ${starts}`,
  );
  assert.equal(partials(data), []);
});

test('a body cut on every attempt fails loudly, naming the file; nothing under its final name; the rerun completes', async () => {
  const file = path.join(data, VIDEO);
  fs.rmSync(file);
  proxy.cutAnswer(['get'], 1 * MiB, 0, 100);
  const r = await restore([]);
  proxy.clearFaults();
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /✗ outputs\/user002\/video\.mp4: /);
  assert.match(r.stdout, /Restore FAILED/);
  assert.not.ok(fs.existsSync(file), 'no file under its final name');
  assert.equal(partials(data), [], 'no temporary file left');
  const again = await restore([]);
  assert.is(again.code, 0, out(again));
  assert.is(sha256(fs.readFileSync(file)), backedUp[VIDEO]);
});

test('SIGINT during a download: no partial file under a final name, none left; exit 1; the rerun completes', async () => {
  const file = path.join(data, VIDEO);
  fs.rmSync(file);
  proxy.throttleAnswers(['get'], 2 * MiB);
  let pid = 0;
  const from = proxy.log.length;
  const running = runScript('restore-mello.mts', [], env, { onSpawn: (p) => (pid = p), limitMs: 60_000 });
  await proxy.waitFor(
    () => proxy.log.slice(from).some((e) => e.key === VIDEO && e.answerBytes > MiB),
    30_000,
    'the video half-way',
  );
  process.kill(pid, 'SIGINT');
  const r = await running;
  proxy.clearFaults();
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /interrupted/);
  assert.not.ok(fs.existsSync(file), 'no file under its final name');
  assert.equal(partials(data), [], 'no temporary file left');
  assert.not.ok(fs.existsSync(path.join(env.COMFYMULTI_STATE_DIR, 'restore-mello.lock')), 'lock released');
  const again = await restore([]);
  assert.is(again.code, 0, out(again));
  assert.equal(treeDigest(data), backedUp);
});

test('--drill passes on a whole bucket; fails naming a damaged object; samples within DRILL_MAX_BYTES', async () => {
  const before = s3.requests.length;
  const ok = await restore(['--drill', '--json']);
  assert.is(ok.code, 0, out(ok));
  const steps = json(ok).steps;
  assert.is(
    steps.reduce((n, s) => n + s.data!.readBack, 0),
    Object.keys(backedUp).length,
    'every object read back',
  );
  assert.match(ok.stderr, /all read back/);
  assert.equal(
    s3.requests.slice(before).filter((q) => q.method !== 'GET' && q.method !== 'HEAD'),
    [],
    'changes nothing in R2',
  );
  assert.equal(treeDigest(data), backedUp, 'changes nothing on Mello');

  // Same size, other bytes, metadata untouched: only reading the bytes back can tell.
  const stored = path.join(s3.dir, BUCKET, 'user_data/user001/comfy.settings.json._S3rver_object');
  const original = fs.readFileSync(stored);
  fs.writeFileSync(stored, Buffer.alloc(original.length, 'x'));
  try {
    const bad = await restore(['--drill']);
    assert.is(bad.code, 1, out(bad));
    assert.match(bad.stdout, `damaged: r2://${BUCKET}/user_data/user001/comfy.settings.json`);
    assert.match(bad.stdout, /Drill FAILED/);
    const verify = await restore(['--verify']);
    assert.is(verify.code, 1, '--verify is the drill');
    assert.match(verify.stdout, 'damaged: ');
  } finally {
    fs.writeFileSync(stored, original);
  }

  // A budget below the bucket: a sample, never more bytes than allowed.
  const budget = 2 * MiB;
  const sampled = await restore(['--drill', '--json'], { DRILL_MAX_BYTES: String(budget) });
  assert.is(sampled.code, 0, out(sampled));
  const read = json(sampled).steps.reduce((n, s) => n + s.data!.readBytes, 0);
  assert.ok(read <= budget, `${read} bytes read back`);
  assert.match(sampled.stderr, /sampled read back/);
  const deep = await restore(['--verify', '--deep', '--json'], { DRILL_MAX_BYTES: String(budget) });
  assert.is(deep.code, 0, out(deep));
  assert.is(
    json(deep).steps.reduce((n, s) => n + s.data!.readBack, 0),
    Object.keys(backedUp).length,
    '--deep reads every object back',
  );
});

test("--drill fails naming an object that is not Mello's file though that file is not newer", async () => {
  const file = path.join(data, 'inputs/shared/ref.png');
  const st = fs.statSync(file);
  const bytes = fs.readFileSync(file);
  fs.writeFileSync(file, crypto.randomBytes(bytes.length));
  fs.utimesSync(file, st.atime, new Date(st.mtimeMs - 60_000));
  try {
    const r = await restore(['--drill']);
    assert.is(r.code, 1, out(r));
    assert.match(r.stdout, `differs: r2://${BUCKET}/inputs/shared/ref.png is not ${file}`);
  } finally {
    fs.writeFileSync(file, bytes);
  }
  fs.writeFileSync(path.join(data, 'outputs/user001/img_0001.png'), 'made after the backup');
  const changed = await restore(['--drill']);
  assert.is(changed.code, 0, out(changed));
  assert.match(changed.stdout, /1 file here changed since the last backup/);
  fs.writeFileSync(path.join(data, 'outputs/user001/img_0001.png'), 'x');
  const r = await restore(['--overwrite', '--only', 'outputs']);
  assert.is(r.code, 0, out(r));
  assert.equal(treeDigest(data), backedUp);
});

test('usage errors are exit 2 naming the flag or variable, before any request', async () => {
  const before = proxy.log.length;
  for (const [args, said, extra] of [
    [['--user', '../user001'], /--user must be/],
    [['--user', 'a/b'], /--user must be/],
    [['--only', 'user_data,models'], /--only: unknown tree "models"/],
    [['--only', 'inputs', '--user', 'user001'], /inputs\/ has no user directories/],
    [['--to', 'relative/dir'], /--to must be an absolute path/],
    [['--to', path.join(data, 'inputs/shared/ref.png')], /--to: .* is not a directory/],
    [['--quick'], /no --quick/],
    [['--drill', '--dry-run'], /--drill changes nothing/],
    [['--drill', '--overwrite'], /--drill changes nothing/],
    [['--status'], /--status is not available/],
    [['--drill'], /DRILL_MAX_BYTES must be/, { DRILL_MAX_BYTES: '4G' }],
    [['--bogus'], /unknown flag: --bogus/],
    [['--drill', '--as-of', 'yesterday'], /--drill changes nothing/],
    // A flag's value is judged before the configuration: the flag is the mistake to name.
    [
      ['--as-of', 'tomorrowish'],
      /--as-of: "tomorrowish" is not a time/,
      { R2_ENDPOINT: '', R2_USER_FILES_ENDPOINT: '' },
    ],
    [['--list-versions'], /--list-versions needs a value/, { R2_ENDPOINT: '', R2_USER_FILES_ENDPOINT: '' }],
  ] as const) {
    const r = await restore([...args], extra);
    assert.is(r.code, 2, `${args.join(' ')}: ${out(r)}`);
    assert.match(r.stderr, said);
  }
  assert.is(proxy.log.length, before, 'no request');
  const help = await restore(['--help']);
  assert.is(help.code, 0);
  for (const flag of ['--user', '--only', '--to', '--overwrite', '--drill', '--as-of', '--list-versions'])
    assert.match(help.stdout, flag);
});

test('keys that would leave the root (.., an absolute key, a symlink in the way) are refused, never followed', async () => {
  const root = path.join(work, 'engine', 'user_data');
  const outside = path.join(work, 'engine', 'outside');
  fs.mkdirSync(root, { recursive: true });
  fs.mkdirSync(outside);
  fs.symlinkSync(outside, path.join(root, 'linked'));
  const b = new MemoryBackend();
  const put = (key: string, body: string) =>
    b.put(key, bufferSource(Buffer.from(body)), { metadata: { sha256: sha256(body) } });
  await put('user_data/../escape.json', 'x');
  await put('user_data/../../escape.json', 'x');
  await put('user_data//etc/passwd.json', 'x');
  await put('user_data/linked/in-link.json', 'x');
  await put('user_data/ok/fine.json', 'fine');
  await put('outputs/other-tree.json', 'not this tree');
  const cache = await TreeCache.open(path.join(work, 'engine', 'cache.jsonl'), { write: true, keepPassedOver: true });
  const r = await downloadTree({ root, backend: b, prefix: 'user_data/', cache, keepNewer: true });
  assert.equal(
    r.failures.map((f) => f.key).sort(),
    [
      'user_data//etc/passwd.json',
      'user_data/../../escape.json',
      'user_data/../escape.json',
      'user_data/linked/in-link.json',
    ].sort(),
  );
  assert.match(r.failures.find((f) => f.key.includes('linked'))!.error, /is a symlink: not followed/);
  assert.match(r.failures.find((f) => f.key.includes('passwd'))!.error, /would leave/);
  assert.is(fs.readFileSync(path.join(root, 'ok/fine.json'), 'utf8'), 'fine');
  assert.is(r.objects, 5, 'only the tree under its prefix');
  assert.equal(fs.readdirSync(outside), [], 'nothing written through the symlink');
  assert.not.ok(fs.existsSync(path.join(work, 'escape.json')));
  assert.not.ok(fs.existsSync(path.join(work, 'engine', 'escape.json')));
});

test.run();
