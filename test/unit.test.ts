// Unit tests of lib/: pure functions, and the sync's decisions on the in-memory backend. No
// server, no child process: they run in milliseconds, beneath the end-to-end suites.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { readTarMessages } from '../lib/archive.ts';
import { RESTORE_VERDA_FLAGS, UsageError, humanSize, parseFlags, transferLine } from '../lib/cli.ts';
import { BLOCK, Digester, showBytes, walkTree } from '../lib/files.ts';
import { FileDigests, TreeCache, awsCliPartSize, etagProvesContent } from '../lib/hash-cache.ts';
import { LockHeld, acquireLock, isHeld, processStart } from '../lib/lock.ts';
import { AdaptiveSlots, Slots } from '../lib/pacer.ts';
import { pool } from '../lib/pool.ts';
import { rotateByRestorePoints } from '../lib/rotation.ts';
import { repeatedLine } from '../lib/script.ts';
import type { StepReport } from '../lib/step.ts';
import { commandArgs, shellQuote } from '../lib/ssh.ts';
import { MiB } from '../lib/files.ts';
import { MAX_PARTS, MIN_PART_SIZE, partSizeFor, presignGet } from '../lib/r2.ts';
import { datedCopies, datedPattern, isFuture, stampTime, timestamp } from '../lib/dated.ts';
import { listCopies } from '../lib/sfs.ts';
import { listBundles, rotateBundles } from '../lib/archive.ts';
import {
  CountingBackend,
  SourceChanged,
  StorageError,
  fingerprintFile,
  fingerprintedSource,
  readBackSha256,
  type PutOptions,
  type Source,
} from '../lib/storage.ts';
import { downloadTree } from '../lib/download.ts';
import { imageUrlSeconds } from '../lib/restore-image.ts';
import { listingSplits, listRanges, syncTree } from '../lib/sync.ts';
import { bufferSource } from './backend-conformance.ts';
import { MemoryBackend } from './memory-backend.ts';

const tmp = () => fs.mkdtempSync(path.join(os.tmpdir(), 'cms-unit-'));
const sha = (b: Buffer | string) => crypto.createHash('sha256').update(b).digest('hex');
const md5 = (b: Buffer | string) => crypto.createHash('md5').update(b).digest('hex');
const throwsUsage = (fn: () => unknown, names: RegExp) => {
  try {
    fn();
  } catch (e) {
    assert.instance(e, UsageError);
    assert.match((e as Error).message, names);
    return;
  }
  assert.unreachable('expected a UsageError');
};

// ---------------------------------------------------------------------------------------------
// cli

test('parseFlags: the SPEC flags, their aliases, and what is refused', () => {
  const f = parseFlags(['--quick', '-v', '--json', '--env-file', '/x.env']);
  assert.equal([f.quick, f.verbose, f.json, f.envFile, f.dryRun], [true, true, true, '/x.env', false]);
  assert.is(parseFlags(['-h']).help, true);
  assert.is(parseFlags(['--full']).quick, false);
  throwsUsage(() => parseFlags(['--qiuck']), /unknown flag: --qiuck/);
  throwsUsage(() => parseFlags(['now']), /unexpected argument: now/);
  throwsUsage(() => parseFlags(['--quick', '--full']), /--quick and --full/);
  throwsUsage(() => parseFlags(['--verify', '--dry-run']), /--verify and --dry-run/);
  throwsUsage(() => parseFlags(['--deep']), /--deep goes with --verify/);
  throwsUsage(() => parseFlags(['--env-file', 'a', '--env-file', 'b']), /more than once/);
  throwsUsage(() => parseFlags(['--env-file']), /--env-file needs a value/);
  assert.is(parseFlags(['--drill'], { boolean: ['drill'] }).extra.drill, true);
});

test("restore-verda's flag rules: what cannot go together is refused naming both, with why", () => {
  const rv = (...argv: string[]) => parseFlags(argv, RESTORE_VERDA_FLAGS);
  throwsUsage(() => rv('--drill', '--from', 'r2'), /--drill and --from r2 cannot be used together/);
  throwsUsage(() => rv('--drill', '--root', '/tmp/x'), /--drill and --root/);
  throwsUsage(() => rv('--verify', '--from', 'sfs'), /--verify and --from sfs/);
  throwsUsage(() => rv('--new-host', '--drill'), /--new-host and --drill .*without connecting to Verda/);
  throwsUsage(() => rv('--new-host', '--verify'), /--new-host and --verify/);
  for (const other of [
    ['--drill'],
    ['--from', 'r2'],
    ['--root', '/r'],
    ['--only', 'ufw'],
    ['--new-host'],
    ['--skip-models'],
  ])
    throwsUsage(() => rv('--list', ...other), new RegExp(`--list and ${other[0]} .*only lists`));
  throwsUsage(() => rv('--from', 'yesterday'), /--from must be a backup's timestamp/);
  assert.equal(rv('--drill', '--from', '20261201-120000').extra.from, { from: 'manifest', stamp: '20261201-120000' });
  assert.is(rv('--list').list, true);
  assert.is(rv('--new-host').extra['new-host'], true);
});

test('a progress line: bytes of the total, rate, ETA, the file; before the total is known it says so', () => {
  const file = { key: 'checkpoints/a\nb.safetensors', bytes: 3 * 1024 ** 2, size: 8 * 1024 ** 2 };
  assert.is(
    transferLine('models sent', { bytes: 10 * 1024 ** 2, total: 40 * 1024 ** 2, file }, 5),
    'models sent: 10M of 40M (25%), 2.0M/s, ETA 0:15; checkpoints/a\\nb.safetensors 3.0M of 8.0M',
  );
  // Verda's first report comes before its listing: not "0B of 0B (100%)".
  assert.is(
    transferLine('models sent', { bytes: 0, total: 0 }, 0.2),
    'models sent: 0B so far, 0B/s (total not known yet)',
  );
  assert.match(transferLine('x', { bytes: 0, total: 5 }, 1), /^x: 0B of 5B \(0%\), 0B\/s, ETA --:--$/);
  // While the listing goes on, the total is what was found so far: no percentage, no ETA.
  assert.is(transferLine('m', { bytes: 1024, total: 4096, counting: true }, 1), 'm: 1.0K of 4.0K found so far, 1.0K/s');
});

test('backup-cron --list: sizes as humanSize prints them, and no line ends in a space', () => {
  const dir = tmp();
  fs.writeFileSync(path.join(dir, 'fail2ban-20261203-104258.tar.gz'), Buffer.alloc(209));
  const text = listCopies(dir, ['tailscale-identity', 'fail2ban'], false);
  assert.match(text, '  tailscale-identity: none\n  fail2ban:\n    fail2ban-20261203-104258.tar.gz  209B\n');
  assert.not.match(text, / \n/);
  fs.rmSync(dir, { recursive: true });
});

test('the summary line of steps failed for a host said unreachable: "Step" for one, "Steps" for more', () => {
  const why = 'not done: dev@verda cannot be reached (said above)';
  const report = (step: number, name: string): StepReport => ({
    ...{ step, name, moves: '', status: 'failed', error: why, repeat: true },
    ...{ warnings: [], failures: [], ms: 0 },
  });
  assert.is(repeatedLine([report(11, 'Models')]), `Step 11 (Models): ${why}`);
  assert.is(repeatedLine([report(2, 'a'), report(3, 'b')]), `Steps 2, 3: ${why}`);
});

test('rotation says "1 restore point kept", and "points" for any other count', () => {
  const dir = tmp();
  const point = (stamp: string) => ({
    ...{ name: `manifest-${stamp}.json`, stamp, file: path.join(dir, `manifest-${stamp}.json`) },
    judgement: { state: 'whole' as const, why: [] },
  });
  const noteOf = (points: ReturnType<typeof point>[]) => rotateByRestorePoints(dir, points, 10, []).notes[0];
  assert.match(noteOf([point('20261203-105135')]), /^1 restore point kept \(1 whole\)/);
  assert.match(noteOf([point('20261203-105135'), point('20261202-105135')]), /^2 restore points kept/);
  assert.match(noteOf([]), /^0 restore points kept/);
  fs.rmSync(dir, { recursive: true });
});

test("the image URL Verda downloads with holds an hour at least, the image at 256 KiB/s, at most S3's 7 days", () => {
  assert.is(imageUrlSeconds(2.5e9 / 100), 3600);
  assert.is(imageUrlSeconds(10 * 1024 ** 3), 40_960);
  assert.is(imageUrlSeconds(1024 ** 4), 7 * 86_400);
});

test('humanSize prints as du -h does', () => {
  assert.equal([0, 512, 4096, 1536 * 1024, 45 * 1024 ** 3].map(humanSize), ['0B', '512B', '4.0K', '1.5M', '45G']);
});

// ---------------------------------------------------------------------------------------------
// r2: part sizes

test('partSizeFor: equal parts of at least 5 MiB, whole MiB, at most 10,000 of them', () => {
  assert.is(partSizeFor(100 * MiB, 16 * MiB), 16 * MiB);
  assert.is(partSizeFor(100 * MiB, MiB), MIN_PART_SIZE, 'never below 5 MiB');
  const fifty = 50 * 1024 ** 3;
  const p = partSizeFor(fifty, 5 * MiB);
  assert.ok(p > 5 * MiB, 'a 50 GB model needs parts over 5 MiB');
  assert.ok(Math.ceil(fifty / p) <= MAX_PARTS);
  assert.is(p % MiB, 0, 'a whole number of MiB: parts stay block-aligned');
});

test('awsCliPartSize: 8 MiB, doubled until 10,000 parts suffice', () => {
  assert.is(awsCliPartSize(100 * MiB), 8 * MiB);
  assert.is(awsCliPartSize(8 * MiB * 10_000), 8 * MiB);
  assert.is(awsCliPartSize(8 * MiB * 10_000 + 1), 16 * MiB);
});

test('etagProvesContent: a single-part MD5, and md5-N recomputed with aws-cli parts; anything else is no proof', async () => {
  const dir = tmp();
  const small = path.join(dir, 'small');
  fs.writeFileSync(small, 'hello');
  assert.is(await etagProvesContent(small, 5, md5('hello')), true);
  assert.is(await etagProvesContent(small, 5, md5('other')), false);
  assert.is(await etagProvesContent(small, 5, 'not-an-etag'), false);
  const big = path.join(dir, 'big');
  const data = crypto.randomBytes(20 * MiB + 7);
  fs.writeFileSync(big, data);
  const parts = [0, 8 * MiB, 16 * MiB].map((at) =>
    crypto
      .createHash('md5')
      .update(data.subarray(at, at + 8 * MiB))
      .digest(),
  );
  const etag = `${md5(Buffer.concat(parts))}-3`;
  assert.is(await etagProvesContent(big, data.length, etag), true);
  assert.is(await etagProvesContent(big, data.length, `${md5(Buffer.concat(parts))}-4`), false, 'another part count');
  fs.rmSync(dir, { recursive: true });
});

// ---------------------------------------------------------------------------------------------
// rotation: dated names

test('dated names: the pattern, newest first, stamps in the future', () => {
  const t = timestamp(new Date(2026, 10, 28, 9, 5, 7));
  assert.is(t, '20261128-090507');
  assert.is(stampTime(t).getTime(), new Date(2026, 10, 28, 9, 5, 7).getTime());
  const re = datedPattern('home-dev', 'tar.gz');
  assert.ok(re.test('home-dev-20261128-090507.tar.gz'));
  assert.not.ok(re.test('home-dev-20261128-090507.tar.gz.partial-1'));
  assert.not.ok(re.test('xhome-dev-20261128-090507.tar.gz'));
  assert.not.ok(datedPattern('a.b', 'json').test('aXb-20261128-090507.json'), 'the kind is literal');
  const names = [
    'ufw-20260101-000000.tar.gz',
    'ufw-20261128-090507.tar.gz',
    'ufw-20250101-000000.tar.gz',
    'other',
    'ufw-latest.tar.gz',
  ];
  assert.equal(datedCopies(names, 'ufw', 'tar.gz'), [
    'ufw-20261128-090507.tar.gz',
    'ufw-20260101-000000.tar.gz',
    'ufw-20250101-000000.tar.gz',
  ]);
  assert.ok(isFuture('20991231-000000'));
  assert.not.ok(isFuture(timestamp()));
});

test('rotateBundles keeps the newest KEEP bundles, plain or encrypted, and touches nothing else; listBundles orders them', async () => {
  const b = new MemoryBackend();
  const stamps = ['20260101-000000', '20260102-000000', '20260103-000000', '20260104-000000'];
  for (const s of stamps)
    await b.put(`verda-config-backups/verda-config-backup-${s}.tar.gz`, bufferSource(Buffer.from(s)));
  await b.put('verda-config-backups/notes.txt', bufferSource(Buffer.from('x')));
  await b.put('verda-config-backup.tar.gz', bufferSource(Buffer.from('latest')));
  // The newest stamp also as age-encrypted: the encrypted copy is listed first.
  await b.put('verda-config-backups/verda-config-backup-20260104-000000.tar.gz.age', bufferSource(Buffer.from('e')));
  assert.equal(
    (await listBundles(b)).map((x) => `${x.stamp}${x.encrypted ? '.age' : ''}`),
    ['20260104-000000.age', '20260104-000000', '20260103-000000', '20260102-000000', '20260101-000000'],
  );
  // A fresh Mello (BACKUP_DIR without KEEP restore points of its own) deletes nothing in R2.
  const none = await rotateBundles(b, 3, { keptStamps: new Set(), trim: false });
  assert.equal(none.deleted, []);
  assert.match(none.notes.join(), /5 dated bundles kept/);
  // A bundle a kept restore point names is never deleted, however old.
  const kept = await rotateBundles(b, 4, { keptStamps: new Set(['20260101-000000']), trim: true });
  assert.equal(kept.deleted, []);
  const gone = (await rotateBundles(b, 3, { keptStamps: new Set(), trim: true })).deleted;
  assert.equal(
    gone.sort(),
    stamps.slice(0, 2).map((s) => `verda-config-backups/verda-config-backup-${s}.tar.gz`),
  );
  assert.equal([...b.objects.keys()].sort(), [
    'verda-config-backup.tar.gz',
    'verda-config-backups/notes.txt',
    'verda-config-backups/verda-config-backup-20260103-000000.tar.gz',
    'verda-config-backups/verda-config-backup-20260104-000000.tar.gz',
    'verda-config-backups/verda-config-backup-20260104-000000.tar.gz.age',
  ]);
  // Encrypted: every plaintext bundle goes, the latest plaintext key too.
  await rotateBundles(b, 3, { keptStamps: new Set(), trim: true, encryptTo: ['age1unused'], tmpDir: tmp() });
  assert.equal([...b.objects.keys()].sort(), [
    'verda-config-backups/notes.txt',
    'verda-config-backups/verda-config-backup-20260104-000000.tar.gz.age',
  ]);
});

// ---------------------------------------------------------------------------------------------
// archive: tar's messages

test('readTarMessages: a file tar could not read is a named warning; anything else is fatal', () => {
  const ok = readTarMessages(
    'tar: ./data/root.db: Cannot open: Permission denied\ntar: ./x: file changed as we read it\ntar: Exiting with failure status due to previous errors\n',
  );
  assert.equal(ok.other, []);
  assert.equal(ok.fileProblems, [
    './data/root.db: Cannot open (Permission denied): not in the archive',
    './x: file changed as we read it',
  ]);
  const bad = readTarMessages(
    'tar: /nope: Cannot open: No such file or directory\ntar: Error is not recoverable: exiting now\n',
  );
  assert.equal(bad.other, ['tar: Error is not recoverable: exiting now']);
  assert.equal(
    readTarMessages('tar: -: Cannot write: No space left on device\n').other.length,
    1,
    'a write error is not a file problem',
  );
});

// ---------------------------------------------------------------------------------------------
// files: names, digests, fingerprints

test('showBytes shows what is not UTF-8 as \\xNN and keeps the rest', () => {
  assert.is(showBytes(Buffer.from('café ü 日本.txt')), 'café ü 日本.txt');
  assert.is(showBytes(Buffer.concat([Buffer.from('caf'), Buffer.from([0xe9]), Buffer.from('.png')])), 'caf\\xe9.png');
  assert.is(showBytes(Buffer.from([0xff, 0xfe, 0x41])), '\\xff\\xfeA');
});

test('Digester: the sha256 of all bytes, and a crc32 per 1 MiB block, however the chunks fall', () => {
  const data = crypto.randomBytes(2 * BLOCK + 100);
  const a = new Digester();
  a.update(data);
  const b = new Digester();
  for (let at = 0; at < data.length; at += 77_777) b.update(data.subarray(at, at + 77_777));
  const fa = a.finish();
  const fb = b.finish();
  assert.is(fa.sha256, sha(data));
  assert.equal(fa, fb);
  assert.is(fa.blockCrcs.length, 3);
});

test('a fingerprinted file gives exactly its bytes; a change of any kind after fingerprinting is SourceChanged, a deletion a vanished one', async () => {
  const dir = tmp();
  const file = path.join(dir, 'f');
  const data = crypto.randomBytes(3 * BLOCK + 5);
  fs.writeFileSync(file, data);
  const fp = await fingerprintFile(file);
  assert.is(fp.sha256, sha(data));
  const read = async (start: number, end: number) => {
    const chunks: Buffer[] = [];
    for await (const c of fingerprintedSource(file, fp).open(start, end)) chunks.push(c as Buffer);
    return Buffer.concat(chunks);
  };
  assert.ok((await read(0, data.length)).equals(data));
  assert.ok((await read(BLOCK, 2 * BLOCK)).equals(data.subarray(BLOCK, 2 * BLOCK)));
  // One byte rewritten in place (same size; mtime kept as it was): the block check catches it.
  const st = fs.statSync(file);
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, Buffer.from([data[BLOCK + 10] ^ 1]), 0, 1, BLOCK + 10);
  fs.closeSync(fd);
  fs.utimesSync(file, st.atime, st.mtime);
  await read(0, data.length).then(
    () => assert.unreachable('a rewritten block must not pass'),
    (e) => assert.instance(e, SourceChanged),
  );
  // Grown, shrunk: caught before the last byte leaves.
  fs.writeFileSync(file, data);
  const fp2 = await fingerprintFile(file);
  fs.appendFileSync(file, 'more');
  await fingerprintedSource(file, fp2).check!().then(
    () => assert.unreachable('grown'),
    (e) => assert.instance(e, SourceChanged),
  );
  fs.truncateSync(file, BLOCK);
  await (async () => read(0, data.length))().then(
    () => assert.unreachable('shrunk'),
    (e) => assert.instance(e, SourceChanged),
  );
  fs.rmSync(file);
  const gone = await read(0, BLOCK).catch((e) => e);
  assert.instance(gone, SourceChanged);
  assert.is(gone.vanished, true);
  // A small file is read once: its bytes travel with the fingerprint.
  fs.writeFileSync(file, 'small');
  const small = await fingerprintFile(file);
  assert.is(small.data?.toString(), 'small');
  fs.writeFileSync(file, 'SMALL'); // what was read is what is sent
  assert.is((await fingerprintedSource(file, small).readAll!()).toString(), 'small');
  fs.rmSync(dir, { recursive: true });
});

test('walkTree: regular files sorted, symlinks not followed, FIFOs passed over, names that are not UTF-8 reported', async () => {
  const dir = tmp();
  fs.mkdirSync(path.join(dir, 'b'));
  fs.writeFileSync(path.join(dir, 'b/z.txt'), 'z');
  fs.writeFileSync(path.join(dir, 'a.txt'), 'a');
  fs.symlinkSync('/etc', path.join(dir, 'etc-link'));
  require_mkfifo(path.join(dir, 'pipe'));
  fs.writeFileSync(Buffer.concat([Buffer.from(dir + '/bad'), Buffer.from([0xff])]), 'x');
  const w = await walkTree(dir);
  assert.equal(
    w.files.map((f) => f.rel),
    ['a.txt', 'b/z.txt'],
  );
  assert.equal(w.symlinks, ['etc-link']);
  assert.is(w.unreadable.length, 1);
  assert.match(w.unreadable[0].rel, 'bad\\xff');
  assert.match(w.unreadable[0].error, /not valid UTF-8/);
  fs.rmSync(dir, { recursive: true });
});

function require_mkfifo(p: string) {
  const r = spawnSync('mkfifo', [p]);
  assert.is(r.status, 0, 'mkfifo');
}

// ---------------------------------------------------------------------------------------------
// pool

test('pool: at most N at once, items in order, the first error thrown once every started item settled', async () => {
  let running = 0;
  let most = 0;
  const started: number[] = [];
  const settled: number[] = [];
  const e = await pool(
    Array.from({ length: 20 }, (_, i) => i),
    4,
    async (i) => {
      started.push(i);
      running++;
      most = Math.max(most, running);
      await new Promise((r) => setTimeout(r, i === 5 ? 5 : 15));
      running--;
      settled.push(i);
      if (i === 5) throw new Error('five');
    },
  ).catch((x) => x);
  assert.is(e.message, 'five');
  assert.is(most, 4);
  assert.equal(
    started,
    started.slice().sort((a, b) => a - b),
    'taken in order',
  );
  assert.ok(started.length < 20, 'no new item after the failure');
  assert.equal(
    settled.sort((a, b) => a - b),
    started.slice().sort((a, b) => a - b),
    'every started item settled first',
  );
});

test('Slots: waiters go by priority, then in order of arrival', async () => {
  const slots = new Slots(1);
  const order: string[] = [];
  let open!: () => void;
  const first = slots.run(() => new Promise<void>((r) => (open = r)));
  const waiting = [
    slots.run(async () => void order.push('b1'), 2),
    slots.run(async () => void order.push('a1'), 1),
    slots.run(async () => void order.push('b2'), 2),
    slots.run(async () => void order.push('a2'), 1),
  ];
  await new Promise((r) => setTimeout(r, 5));
  open();
  await Promise.all([first, ...waiting]);
  assert.equal(order, ['a1', 'a2', 'b1', 'b2']);
});

test('AdaptiveSlots: grow while throughput grows and callers wait, step back when it does not, halve on congestion', async () => {
  const slots = new AdaptiveSlots(2, 4, 16, 20);
  const wait = (ms: number) => new Promise((r) => setTimeout(r, ms));
  // Work whose throughput rises with what is in flight (a long path): each slot carries 10 units a window.
  const runs = Array.from({ length: 200 }, () =>
    slots.run(async () => {
      await wait(20);
      slots.done(10);
    }),
  );
  await wait(150);
  assert.ok(slots.limit > 4, `grew to ${slots.limit}`);
  assert.ok(slots.limit <= 16, 'never past the budget');
  const before = slots.limit;
  slots.congested();
  assert.is(slots.limit, Math.max(2, Math.floor(before / 2)));
  await Promise.all(runs);
  slots.stop();
});

// ---------------------------------------------------------------------------------------------
// hash cache

test('FileDigests: an unchanged file is not read again; an entry of the wrong shape is dropped', async () => {
  const dir = tmp();
  const file = path.join(dir, 'f');
  fs.writeFileSync(file, 'content');
  const st = fs.statSync(file, { bigint: true });
  const stat = { size: st.size, mtimeNs: st.mtimeNs, ctimeNs: st.ctimeNs, ino: st.ino };
  const cacheFile = path.join(dir, 'cache.json');
  const c1 = FileDigests.load(cacheFile);
  assert.is(await c1.sha256(file, stat), sha('content'));
  c1.trySave();
  const c2 = FileDigests.load(cacheFile);
  assert.is(await c2.sha256(file, stat), sha('content'));
  assert.is(c2.hashed, 0, 'from the cache');
  // Same size, the mtime put back to the nanosecond: only the ctime moved.
  fs.writeFileSync(file, 'CONTENT');
  assert.is(
    spawnSync('touch', [
      '-d',
      `@${st.mtimeNs / 1_000_000_000n}.${String(st.mtimeNs % 1_000_000_000n).padStart(9, '0')}`,
      file,
    ]).status,
    0,
  );
  const edited = fs.statSync(file, { bigint: true });
  assert.is(edited.mtimeNs, st.mtimeNs);
  const seen = await c2.sha256(file, edited);
  assert.is(seen, sha('CONTENT'), 'an edit that put the mtime back is read again');
  fs.writeFileSync(file, 'content');
  fs.writeFileSync(cacheFile, JSON.stringify({ version: 2, files: { [file]: ['x', 1, null, 'no'] } }));
  const c3 = FileDigests.load(cacheFile);
  assert.is(await c3.sha256(file, stat), sha('content'));
  assert.is(c3.hashed, 1, 'hashed again');
  fs.rmSync(dir, { recursive: true });
});

// ---------------------------------------------------------------------------------------------
// sync: why each file is sent or skipped

async function tree(files: Record<string, string>) {
  const root = tmp();
  for (const [rel, content] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(root, rel)), { recursive: true });
    fs.writeFileSync(path.join(root, rel), content);
  }
  return root;
}

test("syncTree: a temporary file of restore-mello's downloads in the tree is never sent; a look-alike name is", async () => {
  const root = await tree({
    'u1/a.json': 'a',
    'u1/.b.json.partial-4242-0123abcd': 'half a download',
    'u1/.c.partial-notes': 'a user file',
  });
  const b = new MemoryBackend();
  const r = await syncTree({ root, backend: b, prefix: '' });
  assert.equal([...b.objects.keys()].sort(), ['u1/.c.partial-notes', 'u1/a.json']);
  assert.is(r.failureCount, 0);
});

test('syncTree: new files are sent with their sha256; an unchanged rerun sends nothing, reads nothing, asks nothing but the listing', async () => {
  const root = await tree({ 'u1/a.json': 'a', 'u2/b.json': 'bb' });
  const memory = new MemoryBackend();
  const b = new CountingBackend(memory);
  const cacheFile = path.join(tmp(), 'tree.jsonl');
  const first = await syncTree({ root, backend: b, prefix: 'user_data/', cacheFile });
  assert.equal([first.sent, first.skipped, first.failures], [2, 0, []]);
  assert.is(memory.objects.get('user_data/u1/a.json')?.metadata.sha256, sha('a'));
  const calls = { ...b.calls };
  const again = await syncTree({ root, backend: b, prefix: 'user_data/', cacheFile });
  assert.equal([again.sent, again.skipped, again.hashed], [0, 2, 0]);
  assert.ok(again.actions.every((a) => a.action === 'skip' && a.how === 'known'));
  assert.equal(
    { list: b.calls.list - calls.list, head: (b.calls.head ?? 0) - (calls.head ?? 0), put: b.calls.put - calls.put },
    { list: 1, head: 0, put: 0 },
  );
});

test("syncTree's progress: bytes sent of the bytes to send; unchanged files are not counted as work", async () => {
  const root = await tree({ 'old.bin': 'x'.repeat(5000), 'new.bin': 'y'.repeat(300) });
  const b = new MemoryBackend();
  await b.put('old.bin', bufferSource(Buffer.from('x'.repeat(5000))), { metadata: { sha256: sha('x'.repeat(5000)) } });
  let last = { sent: 0, total: 0 };
  await syncTree({ root, backend: b, prefix: '', onProgress: (sent, total) => (last = { sent, total }) });
  assert.equal(last, { sent: 300, total: 300 });
});

test("downloadTree's progress: bytes downloaded of the bytes to download; files already in place are not counted as work", async () => {
  const root = await tree({ 'kept.bin': 'k'.repeat(6000) });
  const b = new MemoryBackend();
  await b.put('kept.bin', bufferSource(Buffer.from('k'.repeat(6000))), { metadata: { sha256: sha('k'.repeat(6000)) } });
  await b.put('new.bin', bufferSource(Buffer.from('n'.repeat(700))), { metadata: { sha256: sha('n'.repeat(700)) } });
  let done = 0;
  let total = 0;
  let counting = true;
  const r = await downloadTree({
    root,
    backend: b,
    prefix: '',
    onBytes: (n, toDownload, _file, stillCounting) => ((done += n), (total = toDownload), (counting = stillCounting)),
  });
  assert.equal([r.downloaded, r.inPlace], [1, 1]);
  // Both listed before the new file's bytes came: the total was whole, and said so.
  assert.equal({ done, total, counting }, { done: 700, total: 700, counting: false });
});

test('syncTree: an object proven by its sha256 metadata or by a bash-era ETag is skipped; other bytes of the same size are sent', async () => {
  const root = await tree({ 'meta.txt': 'same', 'bash.txt': 'from bash', 'changed.txt': 'new!' });
  const b = new MemoryBackend();
  await b.put('meta.txt', bufferSource(Buffer.from('same')), { metadata: { sha256: sha('same') } });
  await b.put('bash.txt', bufferSource(Buffer.from('from bash'))); // no metadata: its ETag is the MD5
  await b.put('changed.txt', bufferSource(Buffer.from('old!')), { metadata: { sha256: sha('old!') } });
  const r = await syncTree({ root, backend: b, prefix: '' });
  const how = Object.fromEntries(
    r.actions.map((a) => [a.key, a.action === 'skip' ? a.how : a.action === 'send' ? a.reason : 'failed']),
  );
  assert.equal(how, { 'bash.txt': 'etag', 'changed.txt': 'changed', 'meta.txt': 'metadata' });
  assert.is(r.adopted, 1);
  assert.is(b.objects.get('changed.txt')?.data.toString(), 'new!');
});

test('syncTree: --dry-run stores nothing; one failing file is recorded and the rest are sent; refused credentials stop the run', async () => {
  const root = await tree({ a: '1', b: '2', c: '3' });
  const b = new MemoryBackend();
  const dry = await syncTree({ root, backend: b, prefix: '', dryRun: true });
  assert.is(dry.sent, 3);
  assert.is(b.objects.size, 0);
  b.failNextPut.set('b', new StorageError('r2 put: R2 answered 500', false, 500));
  const r = await syncTree({ root, backend: b, prefix: '' });
  assert.equal(
    r.failures.map((f) => f.key),
    ['b'],
  );
  assert.equal([...b.objects.keys()].sort(), ['a', 'c']);
  const c = new MemoryBackend();
  c.failNextPut.set('a', new StorageError('refused', true, 403));
  const e = await syncTree({ root, backend: c, prefix: '', concurrency: 1 }).catch((x) => x);
  assert.instance(e, StorageError);
  assert.is(c.objects.size, 0, 'nothing more was tried');
});

test('syncTree: what is sent is the object’s sha256 (read back), also when the cache knew the file', async () => {
  const root = await tree({ 'x.bin': 'version one' });
  const b = new MemoryBackend();
  const cacheFile = path.join(tmp(), 'tree.jsonl');
  await syncTree({ root, backend: b, prefix: '', cacheFile });
  b.objects.delete('x.bin'); // gone from the bucket: sent again from a cache hit
  await syncTree({ root, backend: b, prefix: '', cacheFile });
  assert.is(await readBackSha256(b, 'x.bin'), b.objects.get('x.bin')!.metadata.sha256);
});

test('syncTree: keys in S3 order even where the walk and JavaScript disagree (a-c before a/x, astral names)', async () => {
  const root = await tree({
    'a/x': '1',
    'a-c': '2',
    'a.b': '3',
    'b/\u{1F600}.txt': '4',
    'b/\uFFFD.txt': '5',
    'b/z.txt': '6',
  });
  const b = new MemoryBackend();
  await syncTree({ root, backend: b, prefix: '' });
  const cacheFile = path.join(tmp(), 'c.jsonl');
  const r = await syncTree({ root, backend: b, prefix: '', cacheFile });
  assert.is(r.skipped, 6, 'every file found in the listing: the merge did not lose its place');
  const keys = fs
    .readFileSync(cacheFile, 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l).rel);
  assert.equal(keys, ['a-c', 'a.b', 'a/x', 'b/z.txt', 'b/\uFFFD.txt', 'b/\u{1F600}.txt'], 'UTF-8 byte order');
  assert.equal(
    keys,
    [...keys].sort((x, y) => Buffer.compare(Buffer.from(x), Buffer.from(y))),
  );
});

test('listRanges: split ranges listed at once, every key once and in order, keys between splits included', async () => {
  const b = new CountingBackend(new MemoryBackend());
  const keys = ['p/a.txt', 'p/a/1', 'p/a/2', 'p/b/1', 'p/b0', 'p/c/1', 'p/c/2', 'p/d/9', 'p/zz']; // in byte order
  for (const k of keys) await b.put(k, bufferSource(Buffer.from(k)));
  const got: string[] = [];
  // Splits as a cache gives them: `c/1x` is not in the bucket (a file the last run knew, gone
  // since): its range ends on the first key beyond it, which the next range lists.
  const splits = [{ after: 'a/1' }, { after: 'b0' }, { after: 'c/1x' }];
  for await (const o of listRanges(b, 'p/', splits)) got.push(o.key);
  assert.equal(got, keys);
  assert.is(b.calls.list, 4, 'one listing per range, at once');
});

test('syncTree: a server asking to slow down (429/503) halves the files sent at once', async () => {
  const files: Record<string, string> = {};
  for (let i = 0; i < 60; i++) files[`f${String(i).padStart(2, '0')}.txt`] = `file ${i}`;
  const root = await tree(files);
  // A bucket that asks to slow down once, during the first PUT, and counts PUTs in flight.
  class SlowDown extends MemoryBackend {
    listeners: (() => void)[] = [];
    inFlight = 0;
    mostAfter = 0;
    asked = false;
    onCongestion(listener: () => void) {
      this.listeners.push(listener);
    }
    async put(key: string, source: Source, opts?: PutOptions) {
      this.inFlight++;
      if (this.asked) this.mostAfter = Math.max(this.mostAfter, this.inFlight);
      try {
        await new Promise((resolve) => setTimeout(resolve, 5));
        if (!this.asked) {
          this.asked = true;
          for (const l of this.listeners) l();
        }
        return await super.put(key, source, opts);
      } finally {
        this.inFlight--;
      }
    }
  }
  const b = new SlowDown();
  const r = await syncTree({ root, backend: b, prefix: '' });
  assert.is(r.sent, 60);
  assert.ok(b.mostAfter > 0 && b.mostAfter <= 8, `${b.mostAfter} in flight after the 429: at most half of 16`);
});

test('listingSplits: ranges of whole pages off the cache, so they cost what one listing costs', async () => {
  const dir = tmp();
  const cacheFile = path.join(dir, 'tree.jsonl');
  const rel = (i: number) => `u${String(Math.floor(i / 300)).padStart(3, '0')}/é ${String(i).padStart(6, '0')}.png`;
  const line = (i: number) => JSON.stringify({ rel: rel(i), size: 1, mtimeNs: '1', ino: '1', sha256: 'x' }) + '\n';
  const write = (n: number) => fs.writeFileSync(cacheFile, Array.from({ length: n }, (_, i) => line(i)).join(''));
  write(1000);
  assert.equal(listingSplits(cacheFile), [], 'one page: one listing');
  write(20_500); // 21 pages: 7 ranges of 3 pages
  const splits = listingSplits(cacheFile);
  assert.equal(
    splits.map((s) => s.after),
    [1, 2, 3, 4, 5, 6].map((r) => rel(r * 3000 - 1)),
  );
  assert.equal(listingSplits(cacheFile, 2), [{ after: rel(10_999) }], '21 pages in 2 ranges: 11 and 10');
  write(3000); // exactly 3 pages, the last line without its newline
  fs.truncateSync(cacheFile, fs.statSync(cacheFile).size - 1);
  assert.equal(
    listingSplits(cacheFile).map((s) => s.after),
    [rel(999), rel(1999)],
  );
  assert.equal(listingSplits(path.join(dir, 'none.jsonl')), []);
  fs.writeFileSync(cacheFile, line(5).repeat(2500));
  assert.equal(listingSplits(cacheFile), [], 'not sorted: one listing');

  // Against a bucket that holds what the cache knows: every range ends on a page's last key.
  write(2_500);
  const ranges = listingSplits(cacheFile); // 3 pages: 3 ranges of 1
  assert.is(ranges.length, 2);
  const mem = new MemoryBackend();
  for (let i = 0; i < 2_500; i++) await mem.put('p/' + rel(i), bufferSource(Buffer.from('x')));
  let pages = 0;
  const paged = Object.assign(Object.create(mem) as MemoryBackend, {
    async *list(prefix: string, signal?: AbortSignal, startAfter?: string) {
      let n = 0;
      for await (const o of mem.list(prefix, signal, startAfter)) {
        if (n++ % 1000 === 0) pages++; // a page is asked for when its first key is
        yield o;
      }
    },
  });
  let listed = 0;
  for await (const o of listRanges(paged, 'p/', ranges)) assert.is(o.key, 'p/' + rel(listed++));
  assert.is(listed, 2_500);
  assert.is(pages, 3, 'the pages of one listing, no more');
});

test('TreeCache: each line once, sorted, after a run that keeps what it passes over and after a whole walk', async () => {
  const dir = tmp();
  const file = path.join(dir, 'tree.jsonl');
  // The sha256 field names the run that wrote the line (a valid hash: the cache checks its lines).
  const runs = ['old', 'new', 'walked'];
  const line = (rel: string, run = 'old') => ({ rel, size: 1, mtimeNs: '1', ino: '1', sha256: sha(run) });
  const rels = () =>
    fs
      .readFileSync(file, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l))
      .map((l) => `${l.rel}:${runs.find((r) => sha(r) === l.sha256)}`);
  fs.writeFileSync(file, ['a', 'b', 'c', 'd'].map((r) => JSON.stringify(line(r)) + '\n').join(''));

  // A restore: looks up b and c (settling new lines), passes a over, ends before d.
  const restore = await TreeCache.open(file, { write: true, keepPassedOver: true });
  for (const rel of ['b', 'c']) {
    assert.ok(await restore.lookup(rel));
    restore.settle(restore.reserve(), line(rel, 'new'));
  }
  assert.is(await restore.finish(false), undefined);
  assert.equal(rels(), ['a:old', 'b:new', 'c:new', 'd:old'], 'no line twice: the next run trusts the file');

  // A whole walk that meets a and c only: b and d are files gone.
  const walk = await TreeCache.open(file, { write: true });
  for (const rel of ['a', 'c']) {
    assert.ok(await walk.lookup(rel), rel);
    walk.settle(walk.reserve(), line(rel, 'walked'));
  }
  assert.is(await walk.finish(true), undefined);
  assert.equal(rels(), ['a:walked', 'c:walked']);

  // An interrupted walk keeps the lines past its last file.
  fs.writeFileSync(file, ['a', 'b', 'c'].map((r) => JSON.stringify(line(r)) + '\n').join(''));
  const cut = await TreeCache.open(file, { write: true });
  assert.ok(await cut.lookup('a'));
  cut.settle(cut.reserve(), line('a', 'walked'));
  assert.is(await cut.finish(false), undefined);
  assert.equal(rels(), ['a:walked', 'b:old', 'c:old']);
});

// ---------------------------------------------------------------------------------------------
// ssh: commands as templates

test('commandArgs: zx rules; shellQuote: each argument one word for the remote shell, never code', () => {
  const image = '--help';
  const entries = ['a b', "it's", '$(touch PWNED)'];
  assert.equal(commandArgs`${'docker'} image inspect --format {{.Id}} ${image}`, [
    'docker',
    'image',
    'inspect',
    '--format',
    '{{.Id}}',
    '--help',
  ]);
  assert.equal(commandArgs`tar --directory=${'/x y'} -- ${entries}`, ['tar', '--directory=/x y', '--', ...entries]);
  assert.equal(commandArgs`echo ${''} ${[]} end`, ['echo', '', 'end']);
  assert.equal(commandArgs`  sh -c ${'a\nb'}  `, ['sh', '-c', 'a\nb']);
  assert.equal(entries.map(shellQuote), [`'a b'`, `'it'\\''s'`, `'$(touch PWNED)'`]);
  const sh = spawnSync('sh', ['-c', `printf '%s\\n' ${entries.map(shellQuote).join(' ')}`], {
    encoding: 'utf8',
    cwd: os.tmpdir(),
  });
  assert.equal(sh.stdout.split('\n').slice(0, 3), entries, 'the shell reads them back as they were');
});

// ---------------------------------------------------------------------------------------------
// lock

test('lock: a live holder is respected; a dead pid, a reused pid, an earlier boot and a silent other host are stale', () => {
  const me = {
    script: 'backup-x',
    pid: process.pid,
    host: os.hostname(),
    procStart: processStart(process.pid),
    started: 'now',
  };
  assert.is(isHeld(me, 'backup-x', 0), true);
  assert.is(isHeld({ ...me, pid: 999_999_999 }, 'backup-x', 0), false, 'no such process');
  assert.is(isHeld({ ...me, procStart: '1' }, 'backup-x', 0), false, 'the pid was reused');
  assert.is(isHeld({ ...me, bootId: 'another-boot' }, 'backup-x', 0), false, 'an earlier boot');
  assert.is(isHeld({ ...me, host: 'other-instance' }, 'backup-x', 60_000), true, 'another host, heartbeat fresh');
  assert.is(isHeld({ ...me, host: 'other-instance' }, 'backup-x', 3600_000), false, 'another host, silent for an hour');
  const dir = tmp();
  const lock = path.join(dir, 'x.lock');
  const release = acquireLock(lock, 'backup-x');
  assert.throws(
    () => acquireLock(lock, 'backup-x'),
    (e: unknown) => e instanceof LockHeld,
  );
  release();
  assert.not.ok(fs.existsSync(lock));
  fs.writeFileSync(lock, '999999999\n');
  acquireLock(lock, 'backup-x')();
  fs.rmSync(dir, { recursive: true });
});

test("presignGet: SigV4 query signing as @smithy/signature-v4 5.7.5 (the SDK's signer) signs the same GET; one object, an expiry", () => {
  const target = {
    endpoint: 'https://acct.r2.cloudflarestorage.com',
    bucket: 'my-cache',
    accessKeyId: 'AKIDEXAMPLE',
    secretAccessKey: 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY',
  };
  const url = new URL(presignGet(target, 'dir/worker image+ü.tar.gz', 3600, Date.UTC(2026, 11, 3, 12, 0, 0)));
  assert.is(url.origin, 'https://acct.r2.cloudflarestorage.com');
  assert.is(url.pathname, '/my-cache/dir/worker%20image%2B%C3%BC.tar.gz');
  assert.is(url.searchParams.get('X-Amz-Expires'), '3600');
  assert.is(url.searchParams.get('X-Amz-Credential'), 'AKIDEXAMPLE/20261203/auto/s3/aws4_request');
  assert.is(url.searchParams.get('X-Amz-SignedHeaders'), 'host');
  // Computed by @smithy/signature-v4's presign for the same request (region auto, UNSIGNED-PAYLOAD).
  assert.is(
    url.searchParams.get('X-Amz-Signature'),
    '17fb0f3f9f3af9d3d890bb0eeef0bb74c8d06b319f50e67fec115a9f22b41aae',
  );
  assert.not.ok(url.href.includes(target.secretAccessKey), 'the secret is not in the URL');
});

test.run();
