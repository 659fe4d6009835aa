// The hostile world of issue 10: files that change while they are sent, crash leftovers, reused
// pids, FIFOs, unreadable files, full and unwritable disks, names that are not UTF-8, clocks that
// were ahead. Each test runs the real scripts against a real S3 server (s3rver, behind the fault
// proxy where the network must be slowed) and real files, and each failed on main at 2b8de19.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writeFileAtomic } from '../lib/files.ts';
import { FaultProxy } from './fault-proxy.ts';
import {
  runScript,
  ROOT,
  SECRET,
  sha256,
  startS3,
  tempDir,
  writeRandomFile,
  writeTree,
  writeHeldLock,
  type RunResult,
  type S3Server,
  out,
} from './helpers.ts';
import { makeVerda } from './verda-fixture.ts';

const USER_FILES = 'comfy-multi-user-files';
const CACHE = 'comfy-multi-cache';
const MODELS = 'comfy-multi-model-vault-backup';
const MiB = 1024 * 1024;
const NOBODY = 65534;

let s3: S3Server;
let proxy: FaultProxy;
let work: string;

test.before(async () => {
  s3 = await startS3([USER_FILES, CACHE, MODELS]);
  proxy = await FaultProxy.start(s3.endpoint);
  work = tempDir('hostile');
  fs.chmodSync(work, 0o755); // runs as nobody go through it
});

test.before.each(() => proxy.clearFaults());

test.after(async () => {
  await proxy.close();
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

/** A script as the admin runs it (or as nobody); one that does not end by itself fails the test. */
const run = (
  script: string,
  args: string[],
  env: Record<string, string>,
  opts: { asNobody?: boolean; limitMs?: number; onSpawn?: (pid: number) => void } = {},
) =>
  runScript(script, args, env, {
    limitMs: opts.limitMs ?? 90_000,
    asUser: opts.asNobody ? NOBODY : undefined,
    onSpawn: opts.onSpawn,
  });

const assertNoStack = (r: RunResult) => assert.not.match(r.stdout + r.stderr, /\n\s+at .+:\d+/, 'no stack trace');

/** Short limits: a hung request or command is given up in seconds here, minutes in production. */
const FAST = { COMFYMULTI_R2_TIMEOUT: '3', COMFYMULTI_R2_BACKOFF: '0.05', COMFYMULTI_COMMAND_TIMEOUT: '3' };

/** A fixture Verda under `work/name`, backed up to `work/name/backups` with VERDA_HOST=local. */
function verdaEnv(name: string, extra: Record<string, string> = {}) {
  const root = path.join(work, name);
  const v = makeVerda(path.join(root, 'verda'));
  const env: Record<string, string> = {
    ...v.env,
    VERDA_HOST: 'local',
    BACKUP_DIR: path.join(root, 'backups'),
    COMFYMULTI_STATE_DIR: path.join(root, 'state'),
    R2_ENDPOINT: s3.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    ...FAST,
    ...extra,
  };
  return { root, v, env };
}

function melloEnv(name: string, files: Record<string, string | Buffer>, endpoint = s3.endpoint) {
  const root = path.join(work, name);
  const data = path.join(root, 'data');
  writeTree(data, files);
  const state = path.join(root, 'state');
  const env = {
    R2_ENDPOINT: endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    COMFYMULTI_STATE_DIR: state,
    MELLO_DATA_DIR: data,
    ...FAST,
  };
  return { root, data, state, env };
}

async function objectSha(bucket: string, key: string): Promise<{ bytes: string; meta?: string }> {
  return { bytes: sha256(await s3.readObject(bucket, key)), meta: (await s3.headObject(bucket, key))?.metadata.sha256 };
}

// ---------------------------------------------------------------------------------------------
// 1. A stale lock whose pid was reused

test('1. a lock left by a crash whose pid now belongs to another process is taken over; a live holder still is not', async () => {
  const m = melloEnv('lock-reuse', { 'user_data/u1/a.json': '{"a":1}' });
  fs.mkdirSync(m.state, { recursive: true });
  const lock = path.join(m.state, 'backup-mello.lock');
  const other = spawn('sleep', ['60']); // a live process that is not backup-mello: the reused pid
  try {
    // A record whose pid is alive but started at another time: the pid was reused.
    fs.writeFileSync(
      lock,
      JSON.stringify({ script: 'backup-mello', pid: other.pid, host: os.hostname(), procStart: '1', started: 'then' }),
    );
    const r2 = await run('backup-mello.mts', [], m.env);
    assert.is(r2.code, 0, out(r2));
    assert.not.ok(fs.existsSync(lock), 'released after the run');
  } finally {
    other.kill();
  }
});

test('1. backup-cron: Mello refusing to start because its lock is held is a failure naming the holder, not "skipped"', async () => {
  // backup-mello on Mello (MELLO_HOST=local here) finds its lock held by a live run.
  const m = melloEnv('cron-mello-locked', { 'user_data/u1/a.json': '{}' });
  const v = makeVerda(path.join(work, 'cron-mello-locked', 'verda'));
  fs.mkdirSync(m.state, { recursive: true });
  writeHeldLock(path.join(m.state, 'backup-mello.lock'), 'backup-mello');
  const r = await run('backup-cron.mts', [], {
    ...v.env,
    ...m.env,
    MELLO_HOST: 'local',
    MELLO_SCRIPTS_DIR: ROOT,
    COMFYMULTI_STATE_DIR: m.state,
  });
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /holds (its|the) lock/, out(r));
  assert.match(r.stdout, new RegExp(`pid ${process.pid}`), 'names the holder');
  assert.not.match(r.stdout, /skipped \(already running/);
});

// ---------------------------------------------------------------------------------------------
// 3 and 4. Files that shrink or grow while they are sent

test('3. a file that shrinks while it is sent (multipart): the run ends, exit 1 naming it, nothing stored, no upload left open; the rerun sends it', async () => {
  const m = melloEnv('shrink', {}, proxy.endpoint);
  const file = path.join(m.data, 'outputs/u1/render.mp4');
  writeRandomFile(file, 40 * MiB);
  proxy.throttle(['upload-part'], 4 * MiB);
  const from = proxy.log.length;
  const running = run('backup-mello.mts', [], m.env);
  await proxy.waitFor(
    () => proxy.of('upload-part', from).some((e) => e.bodyBytes > MiB),
    60_000,
    'the upload under way',
  );
  fs.truncateSync(file, 10 * MiB);
  const r = await running;
  proxy.clearFaults();
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /render\.mp4.*changed while it was being sent/, out(r));
  assertNoStack(r);
  assert.ok(r.ms < 60_000, `ended by itself (${r.ms} ms)`);
  assert.equal(await s3.listKeys(USER_FILES, 'outputs/u1/'), [], 'no object from a file that changed under the upload');
  assert.equal(s3.openUploads(USER_FILES), [], 'the multipart upload was aborted');
  const again = await run('backup-mello.mts', [], m.env);
  assert.is(again.code, 0, out(again));
  const o = await objectSha(USER_FILES, 'outputs/u1/render.mp4');
  assert.is(o.bytes, sha256(fs.readFileSync(file)));
  assert.is(o.meta, o.bytes, 'the sha256 metadata is the bytes’');
});

test('3. a file that shrinks while it is sent (single PUT): exit 1, the previous object kept', async () => {
  const m = melloEnv('shrink-put', {}, proxy.endpoint);
  const file = path.join(m.data, 'inputs/photo.png');
  writeRandomFile(file, 16 * MiB - 1); // just under the multipart threshold: one PUT
  const first = await run('backup-mello.mts', [], m.env);
  assert.is(first.code, 0, out(first));
  const before = await objectSha(USER_FILES, 'inputs/photo.png');
  writeRandomFile(file, 16 * MiB - 1); // new bytes
  proxy.throttle(['put'], 512 * 1024);
  const from = proxy.log.length;
  const running = run('backup-mello.mts', [], m.env);
  await proxy.waitFor(
    () => proxy.of('put', from).some((e) => e.bodyBytes > 256 * 1024),
    60_000,
    'the upload under way',
  );
  fs.truncateSync(file, MiB);
  const r = await running;
  proxy.clearFaults();
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /photo\.png.*changed while it was being sent/, out(r));
  assert.equal(
    await objectSha(USER_FILES, 'inputs/photo.png'),
    before,
    'the previous object stands, whole, with its own sha256',
  );
});

test('4. a file that grows while it is sent: no object whose sha256 is not its bytes, the previous one kept; the rerun sends the grown file', async () => {
  const m = melloEnv('grow', {}, proxy.endpoint);
  const file = path.join(m.data, 'outputs/u2/log.bin');
  writeRandomFile(file, 20 * MiB);
  const first = await run('backup-mello.mts', [], m.env);
  assert.is(first.code, 0, out(first));
  const before = await objectSha(USER_FILES, 'outputs/u2/log.bin');
  writeRandomFile(file, 20 * MiB);
  proxy.throttle(['upload-part'], 4 * MiB);
  const from = proxy.log.length;
  const running = run('backup-mello.mts', [], m.env);
  await proxy.waitFor(
    () => proxy.of('upload-part', from).some((e) => e.bodyBytes > MiB),
    60_000,
    'the upload under way',
  );
  fs.appendFileSync(file, crypto.randomBytes(3 * MiB));
  const r = await running;
  proxy.clearFaults();
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /log\.bin.*changed while it was being sent/, out(r));
  assert.match(r.stdout, /Step 2 \(Outputs\): .*log\.bin/, 'the summary names the step and the file');
  const now = await objectSha(USER_FILES, 'outputs/u2/log.bin');
  assert.equal(now, before, 'the previous object stands with its own sha256');
  assert.equal(s3.openUploads(USER_FILES), []);
  const again = await run('backup-mello.mts', [], m.env);
  assert.is(again.code, 0, out(again));
  const after = await objectSha(USER_FILES, 'outputs/u2/log.bin');
  assert.is(after.bytes, sha256(fs.readFileSync(file)));
  assert.is(after.meta, after.bytes);
});

// ---------------------------------------------------------------------------------------------
// 5. One unreadable file

test('5. a root-owned 0600 file in the project: warned by name, home-dev, comfy-project and the R2 bundle hold everything else', async () => {
  const root = path.join(work, 'unreadable');
  const v = makeVerda(path.join(root, 'verda'));
  const backupDir = path.join(root, 'backups');
  const state = path.join(root, 'state');
  spawnSync('chown', ['-R', `${NOBODY}:${NOBODY}`, root]);
  const secret = path.join(v.project, 'data/user_data/root-owned.db');
  fs.writeFileSync(secret, 'written by a container as root');
  fs.chmodSync(secret, 0o600); // owned by root: nobody cannot read it
  const env = {
    ...v.env,
    VERDA_HOST: 'local',
    BACKUP_DIR: backupDir,
    COMFYMULTI_STATE_DIR: state,
    HOME: root,
    R2_ENDPOINT: s3.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    R2_CACHE_BUCKET: CACHE,
    ...FAST,
  };
  const r = await run('backup-verda.mts', ['--quick'], env, { asNobody: true });
  assert.is(r.code, 0, out(r));
  assert.match(r.stdout, /root-owned\.db: Cannot open.*Permission denied/, 'the unreadable file is named');
  for (const kind of ['comfy-project', 'home-dev']) {
    const archive = fs.readdirSync(backupDir).find((n) => n.startsWith(`${kind}-`));
    assert.ok(archive, `${kind} archive written`);
    const dest = tempDir(`x-${kind}`);
    const x = spawnSync('tar', ['-xzf', path.join(backupDir, archive!), '-C', dest]);
    assert.is(x.status, 0);
    const base = kind === 'home-dev' ? path.join(dest, 'comfy-multi') : dest;
    assert.is(fs.readFileSync(path.join(base, 'app/main.py'), 'utf8'), 'print("hi")\n', `${kind} holds the rest`);
    assert.not.ok(fs.existsSync(path.join(base, 'data/user_data/root-owned.db')));
    fs.rmSync(dest, { recursive: true, force: true });
  }
  assert.ok((await s3.listKeys(CACHE, 'verda-config-backup')).length > 0, 'the R2 bundle was sent');
});

// ---------------------------------------------------------------------------------------------
// 7. A save that is not an image; a Mello copy that is not the recorded image

test('7. a container CLI whose save gives no image is refused and the good image file kept; a damaged Mello copy is saved again', async () => {
  const root = path.join(work, 'image');
  const v = makeVerda(path.join(root, 'verda'));
  const bin = path.join(root, 'bin');
  const backupDir = path.join(root, 'backups');
  // A stand-in `docker` on Verda's PATH: inspect answers an ID, save prints MODE's output.
  fs.mkdirSync(bin, { recursive: true });
  fs.writeFileSync(
    path.join(bin, 'docker'),
    `#!/bin/sh
case "$1 $2" in
  "image inspect") echo "sha256:$(cat "${root}/id")" ;;
  "save "*) if [ "$(cat "${root}/mode")" = good ]; then tar -cf - -C "${v.project}" docker-compose.yml; else echo "Usage: docker save [OPTIONS] IMAGE"; fi ;;
esac
`,
    { mode: 0o755 },
  );
  fs.writeFileSync(path.join(root, 'id'), 'a'.repeat(64));
  fs.writeFileSync(path.join(root, 'mode'), 'good');
  const env = {
    ...v.env,
    PATH: `${bin}:${process.env.PATH}`,
    VERDA_HOST: 'local',
    BACKUP_DIR: backupDir,
    COMFYMULTI_STATE_DIR: path.join(root, 'state'),
    R2_ENDPOINT: s3.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    ...FAST,
  };
  const good = await run('backup-verda.mts', [], env);
  assert.is(good.code, 0, out(good));
  const image = path.join(backupDir, 'worker-image.tar.gz');
  const goodBytes = fs.readFileSync(image);

  fs.writeFileSync(path.join(root, 'id'), 'b'.repeat(64)); // a new image ID, and save prints usage text
  fs.writeFileSync(path.join(root, 'mode'), 'usage');
  await new Promise((r) => setTimeout(r, 1100));
  const bad = await run('backup-verda.mts', [], env);
  assert.is(bad.code, 1, out(bad));
  assert.match(bad.stdout, /did not give a tar stream/);
  assert.ok(fs.readFileSync(image).equals(goodBytes), 'the good image file stands');

  // Mello's copy damaged (same size, other bytes) under the recorded ID: not trusted, saved again.
  fs.writeFileSync(path.join(root, 'id'), 'a'.repeat(64));
  fs.writeFileSync(path.join(root, 'mode'), 'good');
  const damaged = Buffer.from(goodBytes);
  damaged[damaged.length - 10] ^= 0xff;
  fs.writeFileSync(image, damaged);
  await new Promise((r) => setTimeout(r, 1100));
  const again = await run('backup-verda.mts', [], env);
  assert.is(again.code, 0, out(again));
  assert.match(again.stdout, /no longer holds the image.*saved again/);
  assert.ok(fs.readFileSync(image).equals(goodBytes), 'a good copy again');
  const verify = await run('backup-verda.mts', ['--verify'], env);
  assert.is(verify.code, 0, out(verify));
  fs.writeFileSync(image, damaged);
  const verify2 = await run('backup-verda.mts', ['--verify'], env);
  assert.is(verify2.code, 1, out(verify2));
  assert.match(verify2.stdout, /differs: worker-image\.tar\.gz/, '--verify checks the image copy');
});

// ---------------------------------------------------------------------------------------------
// 8. --verify after a failed run

test('8. --verify after a failed run is exit 1 naming the incomplete run, and says what the newest complete backup holds', async () => {
  const { env } = verdaEnv('verify-failed');
  const good = await run('backup-verda.mts', ['--quick'], env);
  assert.is(good.code, 0, out(good));
  await new Promise((r) => setTimeout(r, 1100));
  const failed = await run('backup-verda.mts', ['--quick'], {
    ...env,
    R2_ENDPOINT: 'http://127.0.0.1:9',
    COMFYMULTI_R2_ATTEMPTS: '1',
  });
  assert.is(failed.code, 1, out(failed));
  const r = await run('backup-verda.mts', ['--verify'], env);
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /records an incomplete run: Config bundle to R2 failed/, out(r));
  assert.match(r.stdout, /newest complete backup, manifest-\d{8}-\d{6}\.json, is whole/, out(r));
});

// ---------------------------------------------------------------------------------------------
// 9. A symlink planted at a temporary name

test('9. a symlink planted at the temporary name of a file being written is not followed', () => {
  const dir = tempDir('plant');
  const target = path.join(dir, 'victim');
  fs.writeFileSync(target, 'precious', { mode: 0o644 });
  const file = path.join(dir, 'hashes.json');
  // 2b8de19 wrote through `.NAME.partial-PID`: a symlink there had its target overwritten and made 0600.
  fs.symlinkSync(target, path.join(dir, `.hashes.json.partial-${process.pid}`));
  writeFileAtomic(file, '{"ok":true}', 0o600);
  assert.is(fs.readFileSync(target, 'utf8'), 'precious', 'the target is untouched');
  assert.is(fs.statSync(target).mode & 0o777, 0o644, 'and keeps its mode');
  assert.is(fs.readFileSync(file, 'utf8'), '{"ok":true}');
  assert.ok(fs.lstatSync(file).isFile() && !fs.lstatSync(file).isSymbolicLink());
  fs.rmSync(dir, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------
// 11. A FIFO under a dated name

test('11. a FIFO under a dated name in SFS_BACKUP_DIR does not block backup-cron: warned, ignored, the copy written', async () => {
  const root = path.join(work, 'fifo');
  const v = makeVerda(path.join(root, 'verda'));
  fs.mkdirSync(v.sfsBackups, { recursive: true });
  const fifo = path.join(v.sfsBackups, 'ssh-host-keys-20991231-235959.tar.gz');
  assert.is(spawnSync('mkfifo', [fifo]).status, 0);
  const r = await run(
    'backup-cron.mts',
    [],
    {
      ...v.env,
      MELLO_HOST: 'local',
      MELLO_SCRIPTS_DIR: path.join(root, 'no-mello'),
      COMFYMULTI_STATE_DIR: path.join(root, 'state'),
      ...FAST,
    },
    { limitMs: 60_000 },
  );
  assert.match(r.stdout, /ssh-host-keys-20991231-235959\.tar\.gz is not a regular file: ignored/, out(r));
  assert.ok(
    fs
      .readdirSync(v.sfsBackups)
      .some((n) => /^ssh-host-keys-\d{8}-\d{6}\.tar\.gz$/.test(n) && fs.lstatSync(path.join(v.sfsBackups, n)).isFile()),
    'a real copy written',
  );
  assertNoStack(r);
});

// ---------------------------------------------------------------------------------------------
// 12 and 13. An unwritable or full state directory

test('12. an unwritable COMFYMULTI_STATE_DIR is exit 2 naming it, with no stack', async () => {
  const m = melloEnv('state-unwritable', { 'user_data/u1/a.json': '{}' });
  fs.mkdirSync(m.state, { recursive: true, mode: 0o700 }); // root's: nobody cannot write there
  fs.chmodSync(path.join(work, 'state-unwritable'), 0o755);
  spawnSync('chmod', ['-R', 'a+rX', m.data]);
  const r = await run('backup-mello.mts', [], { ...m.env, HOME: m.root }, { asNobody: true });
  assert.is(r.code, 2, out(r));
  assert.match(r.stderr, /COMFYMULTI_STATE_DIR.*EACCES/);
  assertNoStack(r);
});

test('13. a full state disk: the uploads that worked stand, the run says the hash cache was not saved and names it', async () => {
  const m = melloEnv(
    'state-full',
    Object.fromEntries(Array.from({ length: 200 }, (_, i) => [`user_data/u${i}/workflow-${i}.json`, `{"n":${i}}`])),
  );
  fs.mkdirSync(m.state, { recursive: true });
  const mount = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=8k', 'tmpfs', m.state], { encoding: 'utf8' });
  assert.is(mount.status, 0, mount.stderr);
  try {
    const r = await run('backup-mello.mts', [], m.env);
    assert.is(r.code, 0, out(r));
    assert.match(
      r.stdout,
      new RegExp(`hash cache not saved \\(ENOSPC: ${m.state}/hashes-backup-mello-user_data\\.jsonl`),
      out(r),
    );
    assert.is((await s3.listKeys(USER_FILES, 'user_data/u1')).length > 0, true);
    for (let i = 0; i < 200; i += 37) {
      assert.is(sha256(await s3.readObject(USER_FILES, `user_data/u${i}/workflow-${i}.json`)), sha256(`{"n":${i}}`));
    }
  } finally {
    spawnSync('umount', [m.state]);
  }
});

// ---------------------------------------------------------------------------------------------
// 16. Names that are not UTF-8

test('16. file names that are not valid UTF-8 are named for what they are, each distinctly; the rest is backed up', async () => {
  const m = melloEnv('not-utf8', { 'inputs/ok.png': 'fine' });
  const dir = Buffer.from(path.join(m.data, 'inputs'));
  fs.writeFileSync(Buffer.concat([dir, Buffer.from('/caf'), Buffer.from([0xe9]), Buffer.from('.png')]), 'latin-1 name');
  fs.writeFileSync(Buffer.concat([dir, Buffer.from('/caf'), Buffer.from([0xe8]), Buffer.from('.png')]), 'another');
  const r = await run('backup-mello.mts', [], m.env);
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /inputs\/caf\\xe9\.png: the name is not valid UTF-8/, out(r));
  assert.match(r.stdout, /inputs\/caf\\xe8\.png: the name is not valid UTF-8/, out(r));
  assert.not.match(r.stdout, /ENOENT/);
  assert.is(sha256(await s3.readObject(USER_FILES, 'inputs/ok.png')), sha256('fine'));
});

// ---------------------------------------------------------------------------------------------
// 17. A stamp in the future

test('17. a dated copy from a clock that was ahead is warned about', async () => {
  const root = path.join(work, 'future');
  const v = makeVerda(path.join(root, 'verda'));
  const env = {
    ...v.env,
    MELLO_HOST: 'local',
    MELLO_SCRIPTS_DIR: path.join(root, 'no-mello'),
    COMFYMULTI_STATE_DIR: path.join(root, 'state'),
    ...FAST,
  };
  await run('backup-cron.mts', [], env);
  const newest = fs.readdirSync(v.sfsBackups).find((n) => n.startsWith('ufw-'))!;
  fs.copyFileSync(path.join(v.sfsBackups, newest), path.join(v.sfsBackups, 'ufw-20991231-120000.tar.gz'));
  const r = await run('backup-cron.mts', [], env);
  assert.match(r.stdout, /ufw-20991231-120000\.tar\.gz is dated in the future/, out(r));
});

// ---------------------------------------------------------------------------------------------
// 18. The rest

test('18. a file deleted between the walk and its upload is a warning, not a failure', async () => {
  const files: Record<string, Buffer> = {};
  for (let i = 0; i < 40; i++)
    files[`outputs/u-vanish/img_${String(i).padStart(3, '0')}.png`] = crypto.randomBytes(300_000);
  const m = melloEnv('vanish', files, proxy.endpoint);
  proxy.throttle(['put'], 1 * MiB);
  const from = proxy.log.length;
  const running = run('backup-mello.mts', [], m.env);
  await proxy.waitFor(() => proxy.of('put', from).length >= 8, 60_000, 'uploads under way');
  fs.rmSync(path.join(m.data, 'outputs/u-vanish/img_039.png'));
  proxy.clearFaults();
  const r = await running;
  assert.is(r.code, 0, out(r));
  assert.match(r.stdout, /img_039\.png vanished before it was sent/, out(r));
  assert.is((await s3.listKeys(USER_FILES, 'outputs/u-vanish/')).length, 39);
});

test('18. a hash-cache entry of the wrong type is dropped and the file hashed again, not failed on every run', async () => {
  const m = melloEnv('cache-type', { 'user_data/u1/a.json': '{"a":1}' });
  fs.mkdirSync(m.state, { recursive: true });
  const file = path.join(m.data, 'user_data/u1/a.json');
  const r0 = await run('backup-mello.mts', [], m.env);
  assert.is(r0.code, 0, out(r0));
  fs.writeFileSync(file, '{"a":2}');
  fs.writeFileSync(
    path.join(m.state, 'hashes-backup-mello-user_data.jsonl'),
    '{"rel":"u1/a.json","size":"x","mtimeNs":5}\nnot json\n',
  );
  const r = await run('backup-mello.mts', [], m.env);
  assert.is(r.code, 0, out(r));
  assert.is(sha256(await s3.readObject(USER_FILES, 'user_data/u1/a.json')), sha256('{"a":2}'));
});

test('18. temporary files a SIGKILL left behind are removed by the next run; a live writer’s are not', async () => {
  const m = melloEnv('partials', { 'user_data/u1/a.json': '{}' });
  fs.mkdirSync(m.state, { recursive: true });
  const dead = path.join(m.state, '.hashes-backup-mello.json.partial-999999999');
  const deadNew = path.join(m.state, '.hashes-backup-mello.json.partial-999999998-0123abcd');
  const live = path.join(m.state, `.other.json.partial-${process.pid}-89abcdef`);
  for (const f of [dead, deadNew, live]) fs.writeFileSync(f, 'half');
  const r = await run('backup-mello.mts', [], m.env);
  assert.is(r.code, 0, out(r));
  assert.not.ok(fs.existsSync(dead), 'an old-style leftover removed');
  assert.not.ok(fs.existsSync(deadNew), 'a leftover removed');
  assert.ok(fs.existsSync(live), 'a live process’s temporary file kept');
});

test('18. -v prints no stack for an expected failure', async () => {
  const { env } = verdaEnv('verbose', {
    CONTAINER_CLI: 'podman',
    CONTAINER_IMAGE: 'no-such-image-here',
  });
  const r = await run('backup-verda.mts', ['-v'], env);
  assert.is(r.code, 1, out(r));
  assert.match(r.stdout, /Container image.*no-such-image-here/s);
  assertNoStack(r);
});

// ---------------------------------------------------------------------------------------------
// Every remote or local command has a timeout

test('a command that hangs (tailscale on Verda) is stopped after COMFYMULTI_COMMAND_TIMEOUT; the run goes on', async () => {
  const bin = path.join(work, 'hang', 'bin');
  fs.mkdirSync(bin, { recursive: true });
  fs.writeFileSync(path.join(bin, 'tailscale'), '#!/bin/sh\nexec sleep 600\n', { mode: 0o755 });
  const { root, env } = verdaEnv('hang', { PATH: `${bin}:${process.env.PATH}`, COMFYMULTI_COMMAND_TIMEOUT: '2' });
  const r = await run('backup-verda.mts', ['--quick'], env, { limitMs: 60_000 });
  assert.match(r.stdout, /Tailscale IP/, out(r));
  assert.match(r.stdout, /nothing from it for 2s: stopped/, out(r));
  assert.ok(fs.existsSync(path.join(root, 'backups')), 'the other steps ran');
  assertNoStack(r);
  const pgrep = spawnSync('pgrep', ['-f', `${bin}/tailscale`], { encoding: 'utf8' });
  assert.is(pgrep.stdout.trim(), '', 'the hung command was stopped');
});

test.run();
