// restore-verda.mts against the real things: the Verda fixture backed up by backup-verda.mts over
// a real sshd on loopback, then restored over that sshd into an empty root (real GNU tar, real
// podman, s3rver for R2, the fault proxy where the network must misbehave).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { PassThrough, Readable } from 'node:stream';
import { DeleteObjectCommand, PutObjectCommand } from '@aws-sdk/client-s3';
import tar from 'tar-stream';
import zlib from 'node:zlib';
import { TreeCache } from '../lib/hash-cache.ts';
import { compareWithArchive } from '../lib/restore.ts';
import { restoreTree } from '../lib/restore-models.ts';
import type { ByteRange } from '../lib/storage.ts';
import { bufferSource } from './backend-conformance.ts';
import { LocalHost } from '../lib/ssh.ts';
import { FaultProxy } from './fault-proxy.ts';
import { MemoryBackend } from './memory-backend.ts';
import {
  runCommand,
  ROOT,
  SECRET,
  runScript,
  s3Env,
  sha256,
  startS3,
  tempDir,
  type RunResult,
  type S3Server,
  out,
  until,
} from './helpers.ts';
import { startSshd, type Sshd } from './sshd.ts';
import { ENV_SECRET, ODD, makeVerda, type VerdaFixture } from './verda-fixture.ts';

const MODELS = 'comfy-multi-model-vault-backup';
const CACHE = 'comfy-multi-cache';
const IMAGE = `comfy-multi-restore-test-${process.pid}`;
const MiB = 1024 * 1024;
const NOBODY = 65534;

let s3: S3Server;
let sshd: Sshd;
let proxy: FaultProxy;
let verda: VerdaFixture;
let work: string;
let backupDir: string;
let fakeBin: string;
let backupEnv: Record<string, string>;
let imageId: string;
const outputs: RunResult[] = [];

function sh(cmd: string, args: string[], input?: Buffer) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input, maxBuffer: 256 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const wait = (ms: number) => new Promise((r) => setTimeout(r, ms));

function importImage(content: string) {
  const rootfs = tempDir('rootfs');
  fs.mkdirSync(path.join(rootfs, 'etc'));
  fs.writeFileSync(path.join(rootfs, 'etc/motd'), content);
  const tarball = path.join(rootfs, '..', `${path.basename(rootfs)}.tar`);
  sh('tar', ['-C', rootfs, '-cf', tarball, '.']);
  sh('podman', ['import', '--quiet', tarball, IMAGE]);
  fs.rmSync(rootfs, { recursive: true });
  fs.rmSync(tarball);
  return sh('podman', ['image', 'inspect', '--format', '{{.Id}}', IMAGE]).trim();
}

const loadedId = () =>
  spawnSync('podman', ['image', 'inspect', '--format', '{{.Id}}', IMAGE], { encoding: 'utf8' }).stdout.trim();

/** A restore as the admin runs it on Mello: Verda over the loopback sshd, its paths the defaults (`/`...). */
function restoreEnv(extra: Record<string, string> = {}): Record<string, string> {
  return {
    ...s3Env(s3, path.join(work, 'mello-state')),
    VERDA_HOST: 'verda',
    SSH_CONFIG: sshd.config,
    BACKUP_DIR: backupDir,
    CONTAINER_CLI: 'podman',
    CONTAINER_IMAGE: IMAGE,
    VERDA_SUDO: '',
    ...extra,
  };
}

async function restore(
  args: string[],
  extra: Record<string, string> = {},
  opts: { onSpawn?: (pid: number) => void } = {},
) {
  // Bounded: a run that ignores a cut link fails here in 2 minutes, not the file at 20.
  const r = await runScript('restore-verda.mts', args, restoreEnv(extra), { limitMs: 120_000, ...opts });
  outputs.push(r);
  return r;
}

/**
 * A fresh Verda as a tree of its own, restored without --root (the image is loaded, services are
 * controlled: through a VERDA_SYSTEMCTL that succeeds): the same paths as `--root into` gives.
 */
function freshEnv(into: string): Record<string, string> {
  const ctl = path.join(work, 'systemctl-ok');
  if (!fs.existsSync(ctl)) fs.writeFileSync(ctl, '#!/bin/sh\nexit 0\n', { mode: 0o755 });
  return {
    VERDA_SYSROOT: into,
    VERDA_HOME: path.join(into, 'home/dev'),
    VERDA_PROJECT_DIR: path.join(into, 'home/dev/comfy-multi'),
    VERDA_MODELS_DIR: path.join(into, 'mnt/sfs/models'),
    SFS_BACKUP_DIR: path.join(into, 'mnt/sfs/cache/backups'),
    VERDA_SYSTEMCTL: ctl,
  };
}

/** Every entry under root (files, dirs, symlinks): type, mode, owner, content digest and mtime. */
function snapshot(root: string, keep: (rel: string) => boolean = () => true): Record<string, string> {
  const result: Record<string, string> = {};
  const visit = (dir: string, rel: string) => {
    for (const name of fs.readdirSync(dir)) {
      const r = rel ? `${rel}/${name}` : name;
      if (!keep(r)) continue;
      const full = path.join(dir, name);
      const st = fs.lstatSync(full);
      const meta = `${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid}`;
      if (st.isDirectory()) {
        result[r] = `dir ${meta} ${Math.floor(st.mtimeMs / 1000)}`;
        visit(full, r);
      } else if (st.isFile())
        result[r] = `file ${meta} ${sha256(fs.readFileSync(full))} ${Math.floor(st.mtimeMs / 1000)}`;
      else if (st.isSymbolicLink()) result[r] = `link ${fs.readlinkSync(full)}`;
    }
  };
  visit(root, '');
  return result;
}

/** GNU tar's `--exclude=X` (the backup's): X's components appear in r's at any depth. */
const excludedAtAnyDepth = (r: string, excludes: string[]) => excludes.some((x) => `/${r}/`.includes(`/${x}/`));

/** What each config kind restores, under a root, and the source tree it must equal. */
function kindCases(into: string) {
  const sys = verda.sysroot;
  return [
    {
      kind: 'tailscale-identity',
      got: path.join(into, 'var/lib'),
      want: path.join(sys, 'var/lib'),
      keep: (r: string) => r === 'tailscale' || r.startsWith('tailscale/'),
    },
    {
      kind: 'ssh-host-keys',
      got: into,
      want: sys,
      keep: (r: string) => r === 'etc' || r === 'etc/ssh' || r.startsWith('etc/ssh/ssh_host_'),
    },
    {
      kind: 'fail2ban',
      got: into,
      want: sys,
      keep: (r: string) =>
        ['etc', 'etc/fail2ban', 'etc/fail2ban/jail.local'].includes(r) || r.startsWith('etc/fail2ban/jail.d'),
    },
    {
      kind: 'ufw',
      got: into,
      want: sys,
      keep: (r: string) => ['etc', 'etc/ufw', 'etc/ufw/user.rules', 'etc/ufw/user6.rules'].includes(r),
    },
    {
      kind: 'home-dev (with project-env, comfy-project, ohmyzsh-custom)',
      got: path.join(into, 'home/dev'),
      want: verda.home,
      keep: (r: string) =>
        !excludedAtAnyDepth(r, [
          '.cache',
          '.local/share',
          '.npm',
          '.docker',
          'comfy-multi/data/models',
          'comfy-multi/data/outputs',
        ]) && !r.split('/').some((c) => c.endsWith('.safetensors')),
    },
  ];
}

/** The parent directories tar made along the way are not entries of an archive: only what it holds is compared. */
function withoutDirMeta(snap: Record<string, string>, dirs: string[]): Record<string, string> {
  const copy = { ...snap };
  for (const d of dirs) if (copy[d]?.startsWith('dir ')) copy[d] = 'dir';
  return copy;
}

function assertRestoredTree(into: string) {
  for (const c of kindCases(into)) {
    const dirs = ['etc', 'etc/ssh', 'etc/fail2ban', 'etc/ufw'];
    assert.equal(
      withoutDirMeta(snapshot(c.got, c.keep), dirs),
      withoutDirMeta(snapshot(c.want, c.keep), dirs),
      `${c.kind} restored as it was`,
    );
  }
  // The project's data/models and outputs, excluded from home-dev and comfy-project, are not there.
  assert.not.ok(fs.existsSync(path.join(into, 'home/dev/comfy-multi/data/models')));
  assert.ok(fs.readFileSync(path.join(into, 'home/dev/comfy-multi/.env'), 'utf8').includes(ENV_SECRET));
  assert.is((fs.statSync(path.join(into, 'home/dev/comfy-multi/.env')).mode & 0o777).toString(8), '600');
}

function assertModels(modelsDir: string) {
  for (const key of ['checkpoints/sd_xl_base.safetensors', 'loras/my lora $(x).safetensors', 'unet/big.safetensors']) {
    assert.is(
      sha256(fs.readFileSync(path.join(modelsDir, key))),
      sha256(fs.readFileSync(path.join(verda.models, key))),
      key,
    );
  }
}

/** Requests for the objects of the models bucket (not its listings). */
const modelGets = (from: number) =>
  s3.requests
    .slice(from)
    .filter((q) => q.method === 'GET' && q.url.startsWith(`/${MODELS}/`) && !q.url.includes('list-type'))
    .map((q) => decodeURIComponent(q.url.split('?')[0].slice(MODELS.length + 2)));

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

function newest(kind: string): string {
  const names = fs
    .readdirSync(backupDir)
    .filter((n) => new RegExp(`^${kind}-\\d{8}-\\d{6}\\.tar\\.gz$`).test(n))
    .sort();
  return path.join(backupDir, names[names.length - 1]);
}

test.before(async () => {
  s3 = await startS3([MODELS, CACHE]);
  proxy = await FaultProxy.start(s3.endpoint);
  sshd = await startSshd(['verda']);
  work = tempDir('restore');
  verda = makeVerda(path.join(work, 'verda'));
  // Owners that must come back: a user tar knows by name, and a bare uid and gid it does not.
  fs.chownSync(path.join(verda.home, '.zshrc'), NOBODY, NOBODY);
  fs.chownSync(path.join(verda.project, 'scripts/start.sh'), 4321, 4322);
  fs.chownSync(path.join(verda.sysroot, 'etc/ufw/user.rules'), 0, NOBODY);
  fs.symlinkSync('scripts/start.sh', path.join(verda.project, 'start-link'));
  backupDir = path.join(work, 'mello/backups/verda');
  imageId = importImage('restore image v1');
  // A `tailscale` that says the address in its file: the backup records it, the restore compares.
  fakeBin = path.join(work, 'bin');
  fs.mkdirSync(fakeBin);
  fs.writeFileSync(path.join(fakeBin, 'tailscale'), `#!/bin/sh\n[ "$1 $2" = "ip -4" ] && cat '${fakeBin}/ip'\n`, {
    mode: 0o755,
  });
  fs.writeFileSync(path.join(fakeBin, 'ip'), '100.64.0.1\n');
  backupEnv = {
    ...s3Env(s3, path.join(work, 'backup-state')),
    ...verda.env,
    VERDA_HOST: 'verda',
    SSH_CONFIG: sshd.config,
    BACKUP_DIR: backupDir,
    CONTAINER_CLI: 'podman',
    CONTAINER_IMAGE: IMAGE,
  };
  const full = await runScript('backup-verda.mts', [], backupEnv);
  assert.is(full.code, 0, out(full));
  await wait(1100);
  // The newest backup is a --quick one (no image: the restore finds it in the full one before),
  // taken with Verda as `local` so that the fake tailscale is on its PATH.
  const quick = await runScript('backup-verda.mts', ['--quick'], {
    ...backupEnv,
    VERDA_HOST: 'local',
    PATH: `${fakeBin}:${process.env.PATH}`,
  });
  assert.is(quick.code, 0, out(quick));
  assert.is(fs.readFileSync(path.join(backupDir, 'tailscale-ip.txt'), 'utf8'), '100.64.0.1\n');
});

test.after(async () => {
  spawnSync('podman', ['rmi', '--force', IMAGE]);
  await proxy.close();
  await s3.stop();
  await sshd.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

test('a command takes a stream on stdin, with backpressure; a failing stream stops it and is its error', async () => {
  const host = new LocalHost([]);
  const big = crypto.randomBytes(12 * MiB);
  const r = await host.$({ stdin: Readable.from([big.subarray(0, 5 * MiB), big.subarray(5 * MiB)]) })`sha256sum`;
  assert.is(r.code, 0);
  assert.is(r.stdout.split(' ')[0], sha256(big));
  const failing = new PassThrough();
  const started = Date.now();
  const running = host.$({ stdin: failing })`sh -c ${'cat >/dev/null; echo finished'}`;
  failing.write(Buffer.alloc(1024));
  setTimeout(() => failing.destroy(new Error('the source broke')), 100);
  // Bounded: a command that a broken stream does not stop fails the test in 5 s, never hangs it.
  const e = await Promise.race([running.catch((x) => x), wait(5000).then(() => new Error('still running after 5 s'))]);
  assert.instance(e, Error);
  assert.is(e.message, 'the source broke');
  assert.ok(Date.now() - started < 5000);
});

/** A memory bucket whose first `cuts` ranged bodies break halfway, as a connection reset would. */
class CuttingBackend extends MemoryBackend {
  cuts = 0;
  gets: string[] = [];
  async get(key: string, signal?: AbortSignal, range?: ByteRange): Promise<Readable> {
    this.gets.push(`${key} ${range ? `${range.start}-${range.end}` : 'whole'}`);
    const body = await super.get(key, signal, range);
    if (!range || this.cuts <= 0) return body;
    this.cuts--;
    const data = Buffer.concat(await body.toArray());
    return Readable.from(
      (async function* () {
        yield data.subarray(0, data.length >> 1);
        throw Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' });
      })(),
    );
  }
}

test('models: cut ranges resumed, bash-era objects by ETag; bad bytes, escapes and symlinks refused', async () => {
  const root = path.join(work, 'unit-models');
  const elsewhere = path.join(work, 'unit-elsewhere');
  fs.mkdirSync(root, { recursive: true });
  fs.mkdirSync(elsewhere);
  const b = new CuttingBackend();
  const big = crypto.randomBytes(5 * MiB + 123);
  const bash = crypto.randomBytes(3000);
  const meta = (data: Buffer | string) => ({ metadata: { sha256: sha256(data) } });
  await b.put('a/big.safetensors', bufferSource(big), meta(big));
  await b.put('bash-era.safetensors', bufferSource(bash)); // no metadata: its ETag (an MD5) proves it
  await b.put('wrong.safetensors', bufferSource(crypto.randomBytes(2000)), { metadata: { sha256: 'f'.repeat(64) } });
  await b.put('../escape.safetensors', bufferSource(Buffer.from('x')), meta('x'));
  await b.put('linked/m.safetensors', bufferSource(Buffer.from('y')), meta('y'));
  await b.put('empty.safetensors', bufferSource(Buffer.alloc(0)), meta(''));
  fs.symlinkSync(elsewhere, path.join(root, 'linked')); // never followed out of the root
  b.cuts = 2;
  const cacheFile = path.join(work, 'models-cache.jsonl');
  const open = () => TreeCache.open(cacheFile, { write: true, keepPassedOver: true });
  const r = await restoreTree({
    root,
    backend: b,
    cache: await open(),
    rangeSize: MiB,
    rangesPerFile: 3,
    files: 2,
    backoffMs: 1,
  });
  assert.ok(fs.readFileSync(path.join(root, 'a/big.safetensors')).equals(big));
  assert.ok(fs.readFileSync(path.join(root, 'bash-era.safetensors')).equals(bash));
  assert.is(fs.statSync(path.join(root, 'empty.safetensors')).size, 0);
  assert.equal(r.failures.map((f) => f.key).sort(), [
    '../escape.safetensors',
    'linked/m.safetensors',
    'wrong.safetensors',
  ]);
  assert.match(r.failures.find((f) => f.key === 'wrong.safetensors')!.error, /not the object's \(sha256 differs\)/);
  assert.match(r.failures.find((f) => f.key === 'linked/m.safetensors')!.error, /is a symlink: not followed/);
  assert.not.ok(fs.existsSync(path.join(root, 'wrong.safetensors')), 'bytes that are not the object are not kept');
  assert.not.ok(fs.existsSync(path.join(work, 'escape.safetensors')));
  assert.equal(fs.readdirSync(elsewhere), []);
  assert.equal(partials(root), []);
  assert.is(b.cuts, 0, 'two bodies were cut');
  // Six ranges of the big model, two of them asked again from where they were cut.
  const bigGets = b.gets.filter((g) => g.startsWith('a/big.safetensors'));
  assert.is(bigGets.length, 8, bigGets.join(', '));
  assert.ok(
    bigGets.some((g) => / \d+-\d+$/.test(g) && Number(g.split(' ')[1].split('-')[0]) % MiB !== 0),
    'a resumed range',
  );
  // Nothing to do the second time, and nothing hashed again: the cache knows what was written.
  b.gets = [];
  const again = await restoreTree({ root, backend: b, cache: await open(), rangeSize: MiB });
  assert.is(again.downloaded, 0);
  assert.is(again.inPlace, 3);
  assert.equal(again.failures.map((f) => f.key).sort(), r.failures.map((f) => f.key).sort());
  assert.is(again.hashed, 0);
  assert.equal(
    b.gets.filter((g) => !g.startsWith('wrong') && !g.startsWith('linked')),
    [],
  );
});

test('usage errors are exit 2 naming the flag, before anything is done', async () => {
  for (const [args, said] of [
    [['--from', 'yesterday'], /--from must be/],
    [['--only', 'tailscale-identity,bogus'], /--only: unknown kind "bogus"/],
    [['--root', 'relative/dir'], /--root must be an absolute path/],
    [['--drill', '--from', 'sfs'], /--drill/],
    [['--verify', '--from', 'r2'], /--verify/],
  ] as const) {
    const r = await restore([...args]);
    assert.is(r.code, 2, out(r));
    assert.match(r.stderr, said, out(r));
  }
  const r = await restore([], { VERDA_SYSTEMCTL: '-x' });
  assert.is(r.code, 2);
  assert.match(r.stderr, /VERDA_SYSTEMCTL/, out(r));
});

test('a fresh Verda over SSH: every kind as its source, the image loaded, every model; one connection', async () => {
  // As its source: contents, modes, owners, mtimes.
  spawnSync('podman', ['rmi', '--force', IMAGE]);
  assert.is(loadedId(), '', 'the image is not loaded before');
  const into = path.join(work, 'fresh');
  const connections = sshd.connections();
  const before = s3.requests.length;
  const r = await restore([], freshEnv(into));
  assert.is(r.code, 0, out(r));
  // The run's one connection, and one more once the host keys are back: Verda must present the key
  // the admin's known_hosts trusts, which only a new handshake shows.
  assert.is(sshd.connections() - connections, 2, 'one SSH connection for the whole restore, and the host key check');
  assertRestoredTree(into);
  assert.is(loadedId(), imageId.replace(/^sha256:/, ''), 'the image loaded with podman is the one backed up');
  const kept = path.join(into, 'mnt/sfs/cache/backups/worker-image.tar.gz');
  assert.is(
    sha256(fs.readFileSync(kept)),
    sha256(fs.readFileSync(path.join(backupDir, 'worker-image.tar.gz'))),
    'Verda keeps an SFS copy',
  );
  assertModels(path.join(into, 'mnt/sfs/models'));
  const gets = modelGets(before);
  assert.ok(gets.filter((k) => k === 'unet/big.safetensors').length >= 3, `ranged GETs of the 20 MiB model: ${gets}`);
  assert.equal(partials(into), [], 'no temporary file left');
  // Odd names survive and run nothing.
  for (const n of ODD) {
    assert.is(
      fs.readFileSync(path.join(into, 'home/dev/comfy-multi/odd', n), 'utf8'),
      `content of ${n}`,
      JSON.stringify(n),
    );
  }
  for (const d of [
    into,
    path.join(into, 'home/dev/comfy-multi'),
    path.join(into, 'home/dev/comfy-multi/odd'),
    os.tmpdir(),
    process.cwd(),
    os.homedir(), // where a remote shell's injection would land: the SSH login's home
  ]) {
    assert.not.ok(fs.existsSync(path.join(d, 'PWNED')), `no PWNED in ${d}`);
  }
  assert.match(r.stdout, /=== Restore complete/, out(r));
});

test('a second restore downloads and loads nothing; a changed model is downloaded alone; none deleted', async () => {
  const into = path.join(work, 'fresh');
  const models = path.join(into, 'mnt/sfs/models');
  fs.writeFileSync(path.join(models, 'checkpoints/mine.safetensors'), 'not in R2');
  let before = s3.requests.length;
  const again = await restore(['--json'], freshEnv(into));
  assert.is(again.code, 0, out(again));
  const summary = JSON.parse(again.stdout);
  assert.is(summary.script, 'restore-verda');
  assert.equal(
    summary.steps.map((x: { status: string }) => x.status),
    Array(11).fill('ok'),
  );
  assert.equal(modelGets(before), [], 'no model read');
  assert.match(again.stdout, /image \w{12} already loaded: nothing to do/, out(again));
  assert.match(again.stdout, /3 models \(20M\): 0 downloaded \(0B\), 3 already in place/, out(again));
  // The same size, other bytes: its sha256 differs.
  const changed = path.join(models, 'checkpoints/sd_xl_base.safetensors');
  const original = fs.readFileSync(changed);
  fs.writeFileSync(changed, crypto.randomBytes(original.length));
  before = s3.requests.length;
  const one = await restore(['--root', into, '--only', 'models']);
  assert.is(one.code, 0, out(one));
  assert.equal([...new Set(modelGets(before))], ['checkpoints/sd_xl_base.safetensors']);
  assert.ok(fs.readFileSync(changed).equals(original));
  assert.is(fs.readFileSync(path.join(models, 'checkpoints/mine.safetensors'), 'utf8'), 'not in R2');
  assertModels(models);
});

test('an image that is not loaded comes from the SFS copy Verda kept, and nothing is sent', async () => {
  spawnSync('podman', ['rmi', '--force', IMAGE]);
  const into = path.join(work, 'fresh');
  const r = await restore(['--only', 'image', '--verbose'], freshEnv(into));
  assert.is(r.code, 0, out(r));
  assert.match(r.stdout, /loaded from \S+\/mnt\/sfs\/cache\/backups\/worker-image.tar.gz\n/, out(r));
  assert.is(loadedId(), imageId.replace(/^sha256:/, ''));
});

test('--root DIR: the image is left under DIR with how to load it; nothing is loaded, nothing outside DIR changes', async () => {
  spawnSync('podman', ['rmi', '--force', IMAGE]);
  const into = path.join(work, 'rooted');
  const verdaBefore = snapshot(verda.root);
  const r = await restore(['--root', into, '--skip-models']);
  assert.is(r.code, 0, out(r));
  const kept = path.join(into, 'mnt/sfs/cache/backups/worker-image.tar.gz');
  assert.match(
    r.stdout,
    /left at \S+worker-image\.tar\.gz, not loaded \(--root\): load it with `gzip -dc \S+ \| podman load`/,
    out(r),
  );
  assert.is(sha256(fs.readFileSync(kept)), sha256(fs.readFileSync(path.join(backupDir, 'worker-image.tar.gz'))));
  assert.is(loadedId(), '', 'no image loaded');
  assert.equal(snapshot(verda.root), verdaBefore, 'the Verda outside DIR is as it was');
  assertRestoredTree(into);
});

test('an image neither loaded, nor on SFS, nor on Mello comes from the cache bucket, relayed by Mello', async () => {
  spawnSync('podman', ['rmi', '--force', IMAGE]);
  const into = path.join(work, 'image-r2');
  const mello = path.join(backupDir, 'worker-image.tar.gz');
  fs.renameSync(mello, `${mello}.away`);
  try {
    const before = s3.requests.length;
    const r = await restore(['--only', 'image'], freshEnv(into));
    assert.is(r.code, 0, out(r));
    assert.match(r.stdout, /Mello's worker-image.tar.gz is not the image manifest-\d{8}-\d{6}\.json records/, out(r));
    assert.match(r.stdout, new RegExp(`loaded from r2://${CACHE}/worker-image.tar.gz; kept as `), out(r));
    assert.ok(
      s3.requests.slice(before).some((q) => q.method === 'GET' && q.url.startsWith(`/${CACHE}/worker-image.tar.gz`)),
    );
    // Verda GETs it itself, through a URL presigned for that one object: no key pair of that bucket.
    assert.ok(
      s3.requests
        .slice(before)
        .some((q) => q.method === 'GET' && /^\/[^/]+\/worker-image\.tar\.gz\?.*X-Amz-Signature=/.test(q.url)),
      'a presigned GET of the image',
    );
    assert.is(loadedId(), imageId.replace(/^sha256:/, ''));
  } finally {
    fs.renameSync(`${mello}.away`, mello);
  }
});

test('services: tailscaled stopped before the identity, started after, the others after; a new IP said', async () => {
  const t = path.join(work, 'services');
  const sys = path.join(t, 'sys');
  const log = path.join(t, 'systemctl.log');
  const recorder = path.join(t, 'systemctl');
  fs.mkdirSync(t);
  // Records each call and whether the identity is in place at that moment; fail2ban is not installed.
  fs.writeFileSync(
    recorder,
    `#!/bin/sh
if [ -f '${sys}/var/lib/tailscale/tailscaled.state' ]; then id=present; else id=absent; fi
echo "$* identity=$id" >> '${log}'
if [ "$2" = fail2ban ]; then echo "Failed to reload fail2ban.service: Unit fail2ban.service not loaded." >&2; exit 5; fi
if [ "$1 $2" = "stop tailscaled" ] && [ -e '${t}/stop-fails' ]; then
  echo "Job for tailscaled.service failed." >&2; exit 1
fi
exit 0
`,
    { mode: 0o755 },
  );
  const env = {
    VERDA_HOST: 'local',
    VERDA_SYSTEMCTL: recorder,
    VERDA_SYSROOT: sys,
    VERDA_HOME: path.join(t, 'home/dev'),
    VERDA_PROJECT_DIR: path.join(t, 'home/dev/comfy-multi'),
    VERDA_MODELS_DIR: path.join(t, 'models'),
    SFS_BACKUP_DIR: path.join(t, 'sfs'),
    PATH: `${fakeBin}:${process.env.PATH}`,
  };
  fs.writeFileSync(path.join(fakeBin, 'ip'), '100.64.0.99\n');
  const r = await restore(['--skip-image', '--skip-models'], env);
  assert.is(r.code, 0, out(r));
  assert.equal(fs.readFileSync(log, 'utf8').trim().split('\n'), [
    'stop tailscaled identity=absent',
    'start tailscaled identity=present',
    'restart ssh identity=present',
    'reload fail2ban identity=present',
    'reload ufw identity=present',
  ]);
  assert.match(
    r.stdout,
    /⚠ TAILSCALE IP CHANGED: Verda came back as 100\.64\.0\.99, the backup recorded 100\.64\.0\.1/,
    out(r),
  );
  const summary = r.stdout.slice(r.stdout.indexOf('=== Restore'));
  assert.match(summary, /TAILSCALE IP CHANGED/, 'said again in the summary');
  assert.match(r.stdout, /reload fail2ban: no such unit on local/, out(r));
  assert.is(
    fs.readFileSync(path.join(sys, 'var/lib/tailscale/tailscaled.state'), 'utf8'),
    '{"node-key":"privkey:abc"}',
  );

  fs.writeFileSync(path.join(fakeBin, 'ip'), '100.64.0.1\n');
  const same = await restore(['--only', 'tailscale-identity'], env);
  assert.is(same.code, 0, out(same));
  assert.match(same.stdout, /Tailscale IP 100\.64\.0\.1 as recorded/, out(same));
  assert.not.match(same.stdout, /CHANGED/);

  // A tailscale that hangs: the IP is not compared (said), after 5 s, and the restore goes on.
  const hung = path.join(t, 'hung-bin');
  fs.mkdirSync(hung);
  fs.writeFileSync(path.join(hung, 'tailscale'), '#!/bin/sh\nexec sleep 600\n', { mode: 0o755 });
  const started = Date.now();
  const hangs = await restore(['--only', 'tailscale-identity'], { ...env, PATH: `${hung}:${process.env.PATH}` });
  assert.is(hangs.code, 0, out(hangs));
  assert.match(
    hangs.stdout,
    /Tailscale IP not compared: tailscale ip -4 did not answer within 5 s on local/,
    out(hangs),
  );
  assert.ok(Date.now() - started < 60_000, `${Date.now() - started} ms`);

  // A tailscaled that cannot be stopped would write over the identity: it is not unpacked.
  fs.rmSync(path.join(sys, 'var/lib/tailscale'), { recursive: true });
  fs.writeFileSync(path.join(t, 'stop-fails'), '');
  const stuck = await restore(['--only', 'tailscale-identity'], env);
  assert.is(stuck.code, 1, out(stuck));
  assert.match(
    stuck.stdout,
    /stop tailscaled failed \(Job for tailscaled.service failed.\): tailscale-identity-\S+ not unpacked/,
    out(stuck),
  );
  assert.not.ok(fs.existsSync(path.join(sys, 'var/lib/tailscale')));
});

test('a damaged or missing artifact: the restore takes the newest whole point; --from it stops before anything changes, naming it, no SSH', async () => {
  const home = newest('home-dev');
  const original = fs.readFileSync(home);
  fs.writeFileSync(home, Buffer.concat([original.subarray(0, 30), Buffer.alloc(original.length - 30)]));
  const ufw = newest('ufw');
  fs.renameSync(ufw, `${ufw}.away`);
  try {
    const into = path.join(work, 'damaged');
    // Without --from: the newest whole restore point, the full one before it, and says why.
    const dry = await restore(['--dry-run', '--root', into, '--skip-models']);
    assert.is(dry.code, 0, out(dry));
    const damagedPoint = `manifest-${path.basename(home).slice('home-dev-'.length, -'.tar.gz'.length)}.json`;
    assert.match(dry.stdout, `${damagedPoint} is passed over: not a whole restore point`, out(dry));
    assert.match(dry.stdout, /✓ manifest-\d{8}-\d{6}\.json: 8 archives checked/, out(dry));
    const connections = sshd.connections();
    const before = s3.requests.length;
    const r = await restore(['--from', damagedPoint.slice(9, 24), '--root', into]);
    assert.is(r.code, 1, out(r));
    assert.match(r.stdout, `damaged: ${path.basename(home)}: its sha256 is not the manifest's`, out(r));
    assert.match(r.stdout, `missing: ${path.basename(ufw)}`, out(r));
    const notRestored = /Step 2: Tailscale identity\n.*\n?\s+– not restored: the backup did not check out/;
    assert.match(r.stdout, notRestored, out(r));
    assert.match(r.stdout, /=== Restore FAILED/, out(r));
    assert.not.ok(fs.existsSync(into), 'nothing restored');
    assert.is(sshd.connections(), connections, 'no SSH connection');
    assert.is(s3.requests.length, before, 'no R2 request');
  } finally {
    fs.writeFileSync(home, original);
    fs.renameSync(`${ufw}.away`, ufw);
  }
});

test('SSH cut during a model download: no file under its final name, none left; the rerun completes', async () => {
  // A 40 MiB model (five ranges) whose third ranged GET the server never answers: the download
  // stands half done when the link is cut.
  const key = 'huge/held.safetensors';
  const data = crypto.randomBytes(40 * MiB);
  await s3.client.send(
    new PutObjectCommand({ Bucket: MODELS, Key: key, Body: data, Metadata: { sha256: sha256(data) } }),
  );
  const into = path.join(work, 'fresh');
  const models = path.join(into, 'mnt/sfs/models');
  const env = { R2_ENDPOINT: proxy.endpoint };
  proxy.clearFaults();
  proxy.hold(['get'], 1, 2);
  try {
    const running = restore(['--root', into, '--only', 'models'], env);
    await proxy.waitFor(() => proxy.log.some((e) => e.outcome === 'held'), 60_000, 'a ranged GET held');
    await until(() => partials(models).length === 1, 10_000, 'the temporary file of the download');
    const sessions = sshd.sessions();
    assert.ok(sessions.length > 0, 'an SSH connection to cut');
    for (const pid of sessions) process.kill(pid, 'SIGKILL');
    const r = await running;
    assert.is(r.code, 1, out(r));
    assert.match(r.stdout, /Step \d+ \(Models \(downloaded by Verda\)\): .*the SSH connection was lost/, out(r));
    assert.not.ok(fs.existsSync(path.join(models, key)), 'nothing under the final name');
    await until(() => partials(models).length === 0, 15_000, 'Verda removed its temporary file');
    proxy.clearFaults();
    const again = await restore(['--root', into, '--only', 'models'], env);
    assert.is(again.code, 0, out(again));
    assert.match(again.stdout, /4 models \(60M\): 1 downloaded \(40M\), 3 already in place/, out(again));
    assert.ok(fs.readFileSync(path.join(models, key)).equals(data));
    assert.equal(partials(models), []);
  } finally {
    proxy.clearFaults();
    await s3.client.send(new DeleteObjectCommand({ Bucket: MODELS, Key: key }));
  }
});

test('--from T restores that backup; a T with no manifest is exit 1 naming it', async () => {
  const stamps = fs
    .readdirSync(backupDir)
    .filter((n) => /^manifest-\d{8}-\d{6}\.json$/.test(n))
    .sort()
    .map((n) => n.slice(9, 24));
  const full = stamps[0]; // the full run, before the --quick one
  const into = path.join(work, 'from-t');
  const r = await restore(['--from', full, '--root', into, '--only', 'ufw,project-env']);
  assert.is(r.code, 0, out(r));
  assert.match(r.stdout, `manifest-${full}.json: 2 archives checked`, out(r));
  assert.match(r.stdout, `ufw-${full}.tar.gz`, out(r));
  assert.ok(fs.existsSync(path.join(into, 'etc/ufw/user.rules')));
  assert.not.ok(fs.existsSync(path.join(into, 'home/dev/.zshrc')), 'only what was asked');
  const none = await restore(['--from', '20000101-000000', '--root', into]);
  assert.is(none.code, 1, out(none));
  assert.match(none.stdout, /no manifest-20000101-000000\.json in /, out(none));
});

test('--dry-run says what it would restore and from where, and changes nothing', async () => {
  const into = path.join(work, 'dry');
  const r = await restore(['--dry-run', '--root', into]);
  assert.is(r.code, 0, out(r));
  assert.match(
    r.stdout,
    /would unpack home-dev-\d{8}-\d{6}\.tar\.gz \(\d+ entries\) into verda:\S+\/dry\/home\/dev/,
    out(r),
  );
  assert.match(r.stdout, /would bring image \w{12} \(\S+\) from Mello's \S+worker-image\.tar\.gz\n/, out(r));
  assert.match(r.stdout, /would download unet\/big.safetensors \(20M, new\)/, out(r));
  assert.match(r.stdout, /3 models \(20M\): 3 to download \(20M\), 0 already in place/, out(r));
  assert.match(r.stdout, /=== Dry run complete/, out(r));
  assert.not.ok(fs.existsSync(into), 'nothing written');
});

test("--from sfs restores the newest SFS copies of backup-cron's kinds; the others are skipped rows", async () => {
  fs.mkdirSync(verda.sfsBackups, { recursive: true });
  for (const kind of ['tailscale-identity', 'ssh-host-keys', 'fail2ban', 'ufw', 'project-env']) {
    fs.copyFileSync(newest(kind), path.join(verda.sfsBackups, path.basename(newest(kind))));
  }
  fs.writeFileSync(path.join(verda.sfsBackups, 'ufw-20000101-000000.tar.gz'), 'an older copy, damaged: never read');
  const into = path.join(work, 'from-sfs');
  const r = await restore(['--from', 'sfs', '--root', into, '--skip-image', '--skip-models'], {
    SFS_BACKUP_DIR: verda.sfsBackups,
  });
  assert.is(r.code, 0, out(r));
  assert.match(r.stdout, /backup-cron keeps no home-dev copy on SFS/, out(r));
  assert.match(r.stdout, /Step 7: Home directory \(dev\)\n.*\n\s+– nothing to restore/, out(r));
  const dirs = ['etc', 'etc/ssh', 'etc/fail2ban', 'etc/ufw'];
  for (const c of kindCases(into).slice(0, 4)) {
    assert.equal(withoutDirMeta(snapshot(c.got, c.keep), dirs), withoutDirMeta(snapshot(c.want, c.keep), dirs), c.kind);
  }
  assert.ok(fs.readFileSync(path.join(into, 'home/dev/comfy-multi/.env'), 'utf8').includes(ENV_SECRET));
  assert.not.ok(fs.existsSync(path.join(into, 'home/dev/.zshrc')));
});

test("--from r2 restores every kind from the cache bucket's bundle, and leaves nothing on Mello", async () => {
  const into = path.join(work, 'from-r2');
  const r = await restore(['--from', 'r2', '--root', into, '--skip-image', '--skip-models']);
  assert.is(r.code, 0, out(r));
  const newest = `r2://${CACHE}/verda-config-backups/verda-config-backup-\\d{8}-\\d{6}\\.tar\\.gz`;
  assert.match(r.stdout, new RegExp(`${newest}: 8 archives checked`), out(r));
  assertRestoredTree(into);
  assert.equal(
    fs.readdirSync(path.join(work, 'mello-state')).filter((n) => n.startsWith('restore-r2-')),
    [],
  );
});

test('--from r2 with a bundle holding a member that is not an artifact: exit 1 naming it, no stack, nothing restored', async () => {
  const pack = tar.pack();
  pack.entry({ name: '../evil' }, 'escaped');
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const c of pack) chunks.push(c as Buffer);
  const body = zlib.gzipSync(Buffer.concat(chunks));
  const Key = 'verda-config-backups/verda-config-backup-20991231-235959.tar.gz'; // the newest
  await s3.client.send(new PutObjectCommand({ Bucket: CACHE, Key, Body: body, Metadata: { sha256: sha256(body) } }));
  try {
    const into = path.join(work, 'from-r2-evil');
    const r = await restore(['--from', 'r2', '--root', into, '--skip-image', '--skip-models']);
    assert.is(r.code, 1, out(r));
    assert.match(r.stdout, /holds "\.\.\/evil", which is not one of its artifacts: not read/, out(r));
    assert.not.match(r.stdout + r.stderr, /\n\s+at .+:\d+/, 'no stack trace');
    assert.not.ok(fs.existsSync(into), 'nothing restored');
    assert.not.ok(fs.existsSync(path.join(work, 'evil')));
    assert.equal(
      fs.readdirSync(path.join(work, 'mello-state')).filter((n) => n.startsWith('restore-r2-')),
      [],
    );
  } finally {
    await s3.client.send(new DeleteObjectCommand({ Bucket: CACHE, Key }));
  }
});

test('a Verda without Node.js 20.15 (20.14 lacks zlib.crc32): the models step fails saying so, and every other step restores', async () => {
  const oldNode = path.join(work, 'old-node');
  fs.mkdirSync(oldNode);
  fs.writeFileSync(path.join(oldNode, 'node'), '#!/bin/sh\necho v20.14.0\n', { mode: 0o755 });
  const into = path.join(work, 'no-node');
  // Started with this Node itself: the `node` on its PATH (Verda's, as VERDA_HOST is local) is the old one.
  const loader = path.join(ROOT, 'node_modules/tsx/dist/loader.mjs');
  const args = ['--import', loader, path.join(ROOT, 'restore-verda.mts'), '--', '--root', into, '--skip-image'];
  const env = {
    ...restoreEnv({ VERDA_HOST: 'local', PATH: `${oldNode}:${process.env.PATH}` }),
    HOME: process.env.HOME ?? '/root',
  };
  const r = await runCommand(process.execPath, args, env, { limitMs: 120_000 });
  outputs.push(r);
  assert.is(r.code, 1, out(r));
  assert.match(
    r.stdout,
    /Node\.js 20\.15 or newer is needed on local to download the models \(found: v20\.14\.0\)/,
    out(r),
  );
  assert.match(r.stdout, /9 ok, 1 skipped, 1 failed/, out(r));
  assertRestoredTree(into);
});

test('--drill on a good backup: one verdict line, no SSH, no temporary root left', async () => {
  const connections = sshd.connections();
  // What a drill killed by SIGKILL left (restored secrets), its pid gone: removed by the next drill.
  const stale = path.join(work, 'mello-state', 'drill-4194303-abcdef');
  fs.mkdirSync(path.join(stale, 'etc/ssh'), { recursive: true });
  fs.writeFileSync(path.join(stale, 'etc/ssh/ssh_host_ed25519_key'), 'secret', { mode: 0o600 });
  const r = await restore(['--drill']); // VERDA_HOST reaches the test's sshd: a connection would count
  assert.is(r.code, 0, out(r));
  const verdicts = r.stdout.split('\n').filter((l) => /drill (passed|FAILED)/.test(l));
  assert.is(verdicts.length, 1, r.stdout);
  // The --quick run's dated bundle (the latest key is rewritten by every run since: no one point's);
  // the full run's three models (its own bundle is superseded by the --quick run's, and not what a
  // restore reads). The image has a step of its own.
  const passed =
    /✓ drill passed: manifest-\d{8}-\d{6}\.json restores whole \(8 archives identical on restore, 4 R2 objects in/;
  assert.match(
    r.stdout,
    /✓ image \w{12} \(manifest-\d{8}-\d{6}\.json\): Mello's worker-image\.tar\.gz and r2:\/\/\S+ hold it whole/,
    out(r),
  );
  assert.match(verdicts[0], passed, out(r));
  assert.match(
    r.stdout,
    /home-dev-\S+ \(\S+\) unpacked into \S+: (\d+) of \1 entries identical to the archive/,
    out(r),
  );
  assert.is(sshd.connections(), connections);
  assert.equal(
    fs.readdirSync(path.join(work, 'mello-state')).filter((n) => n.startsWith('drill-')),
    [],
  );
});

test('--drill fails naming what would not restore: a damaged archive, a model gone from R2', async () => {
  const project = newest('comfy-project');
  const original = fs.readFileSync(project);
  fs.writeFileSync(project, Buffer.concat([original.subarray(0, original.length - 8), Buffer.alloc(8)]));
  try {
    // The restore would pass over that point for the whole one before it: so does the drill, and
    // with --from it the drill fails naming the archive.
    const stamp = path.basename(project).slice('comfy-project-'.length, -'.tar.gz'.length);
    const r = await restore(['--drill', '--from', stamp]);
    assert.is(r.code, 1, out(r));
    assert.match(r.stdout, `✗ drill FAILED: manifest-`, out(r));
    assert.match(r.stdout, `damaged: ${path.basename(project)}: its sha256 is not the manifest's`, out(r));
  } finally {
    fs.writeFileSync(project, original);
  }
  // The newest backup is a --quick one: the models are the last full run's, and checked as such.
  const key = 'loras/my lora $(x).safetensors';
  const model = fs.readFileSync(path.join(verda.models, key));
  await s3.client.send(new DeleteObjectCommand({ Bucket: MODELS, Key: key }));
  try {
    const gone = await restore(['--drill']);
    assert.is(gone.code, 1, out(gone));
    const verdict = gone.stdout.split('\n').find((l) => l.includes('drill FAILED')) ?? '';
    assert.match(verdict, `missing: r2://${MODELS}/${key}`, out(gone));
  } finally {
    await s3.client.send(
      new PutObjectCommand({ Bucket: MODELS, Key: key, Body: model, Metadata: { sha256: sha256(model) } }),
    );
  }
  assert.equal(
    fs.readdirSync(path.join(work, 'mello-state')).filter((n) => n.startsWith('drill-')),
    [],
  );
});

test('--verify checks the backup and its R2 objects on Mello alone, and changes nothing', async () => {
  const connections = sshd.connections();
  const before = s3.requests.length;
  const ok = await restore(['--verify']);
  assert.is(ok.code, 0, out(ok));
  assert.match(ok.stdout, /4 of 4 objects present with their size and sha256/, out(ok));
  assert.match(ok.stdout, /✓ image \w{12} \(manifest-\d{8}-\d{6}\.json\): Mello's worker-image\.tar\.gz and /, out(ok));
  assert.match(ok.stdout, /=== Verify complete/, out(ok));
  assert.is(sshd.connections(), connections);
  assert.equal(
    s3.requests.slice(before).filter((q) => q.method !== 'HEAD'),
    [],
    'HEAD requests only',
  );
});

test("the drill's comparison names each restored entry that differs from its archive", async () => {
  const into = path.join(work, 'compare');
  fs.mkdirSync(into);
  const archive = newest('comfy-project');
  sh('tar', ['-xzf', archive, '-C', into]);
  const signal = new AbortController().signal;
  const good = await compareWithArchive(archive, into, signal);
  assert.equal(good.failures, []);
  assert.ok(good.entries > 10);
  fs.chmodSync(path.join(into, 'scripts/start.sh'), 0o600);
  fs.appendFileSync(path.join(into, 'app/main.py'), '# changed');
  fs.rmSync(path.join(into, 'docker-compose.yml'));
  fs.utimesSync(path.join(into, '.env'), new Date('2020-01-01'), new Date('2020-01-01'));
  fs.chownSync(path.join(into, 'data/user_data/user001/flow.json'), 1234, 1234);
  const bad = await compareWithArchive(archive, into, signal);
  const said = bad.failures.join('\n');
  assert.match(said, /\.\/scripts\/start\.sh: mode 600, the archive's 755/);
  assert.match(said, /\.\/app\/main\.py: contents differ/);
  assert.match(said, /\.\/app\/main\.py: mtime /);
  assert.match(said, /\.\/docker-compose\.yml: not restored/);
  assert.match(said, /\.\/\.env: mtime 2020-01-01/);
  assert.match(said, /flow\.json: owner 1234:1234, the archive's 0:0/);
});

test('no secret in any output: .env contents, keys, the Tailscale state, R2 credentials', async () => {
  const r = await restore(['--root', path.join(work, 'fresh'), '--verbose', '--json']);
  assert.is(r.code, 0, out(r));
  for (const o of outputs) {
    const all = o.stdout + o.stderr;
    for (const secret of [
      ENV_SECRET,
      'project_secret_9',
      'PRIVATE HOST KEY',
      'PRIVATE RSA KEY',
      'privkey:abc',
      SECRET,
    ]) {
      assert.not.ok(all.includes(secret), `${secret} in the output`);
    }
  }
});

// Last: it leaves the cache bucket's bundles encrypted (a run with AGE_RECIPIENTS deletes the plain ones).
test('--from r2 with an age-encrypted bundle: restored with AGE_IDENTITY_FILE, refused naming it without', async () => {
  const key = path.join(work, 'age-key.txt');
  assert.is(spawnSync('age-keygen', ['-o', key]).status, 0, 'age-keygen');
  const recipient = spawnSync('age-keygen', ['-y', key], { encoding: 'utf8' }).stdout.trim();
  await wait(1100);
  const encrypted = await runScript('backup-verda.mts', ['--quick'], { ...backupEnv, AGE_RECIPIENTS: recipient });
  assert.is(encrypted.code, 0, out(encrypted));
  assert.ok((await s3.listKeys(CACHE, 'verda-config-backups/')).some((k) => k.endsWith('.tar.gz.age')));
  // Known only once R2 is read: a failed check of the source, and nothing restored.
  const noKey = path.join(work, 'from-r2-age-no-key');
  const refused = await restore(['--from', 'r2', '--root', noKey, '--skip-image', '--skip-models']);
  assert.is(refused.code, 1, out(refused));
  assert.match(
    refused.stdout,
    /AGE_IDENTITY_FILE is not set: it is needed to restore from .*\.tar\.gz\.age/,
    out(refused),
  );
  assert.not.ok(fs.existsSync(noKey), 'nothing restored');
  const into = path.join(work, 'from-r2-age');
  const r = await restore(['--from', 'r2', '--root', into, '--skip-image', '--skip-models'], {
    AGE_IDENTITY_FILE: key,
  });
  assert.is(r.code, 0, out(r));
  assert.match(r.stdout, /verda-config-backup-\d{8}-\d{6}\.tar\.gz\.age: 8 archives checked/, out(r));
  assertRestoredTree(into);

  // The drill decrypts the encrypted bundle as the restore did: without the identity it fails.
  const blind = await restore(['--drill']);
  assert.is(blind.code, 1, out(blind));
  // Once, naming the variable and the object it could not decrypt.
  const undecrypted = blind.stdout.split('\n').filter((l) => /^\s+✗ AGE_IDENTITY_FILE is not set/.test(l));
  assert.is(undecrypted.length, 1, out(blind));
  // The point's own (dated) bundle: the latest key, rewritten by every run, is not the point's (c9645a7).
  assert.match(undecrypted[0], /it is needed to decrypt r2:\/\/\S+\.tar\.gz\.age/);
  assert.match(undecrypted[0], /r2:\/\/\S+\/verda-config-backups\/verda-config-backup-\d{8}-\d{6}\.tar\.gz\.age/);
  assert.not.match(blind.stdout, /is age-encrypted and not decrypted/, out(blind));
  const drill = await restore(['--drill'], { AGE_IDENTITY_FILE: key });
  assert.is(drill.code, 0, out(drill));
  assert.match(drill.stdout, /\(1 age-encrypted, decrypted with AGE_IDENTITY_FILE\)/, out(drill));
});

test('models come back with the mode they had on Verda (0644 when unknown) in 0755 directories, whatever the umask', async () => {
  const shared = crypto.randomBytes(1000);
  const unknown = crypto.randomBytes(1000);
  await s3.client.send(
    new PutObjectCommand({
      Bucket: MODELS,
      Key: 'modes/shared.safetensors',
      Body: shared,
      Metadata: { sha256: sha256(shared), mode: '640' },
    }),
  );
  // A bash-era upload: no mode recorded.
  await s3.client.send(
    new PutObjectCommand({
      Bucket: MODELS,
      Key: 'modes/old.safetensors',
      Body: unknown,
      Metadata: { sha256: sha256(unknown) },
    }),
  );
  const into = path.join(work, 'modes');
  const umask = process.umask(0o077); // Verda's side is a child of the run: it inherits this
  try {
    const r = await restore(['--root', into, '--only', 'models'], { VERDA_HOST: 'local' });
    assert.is(r.code, 0, out(r));
  } finally {
    process.umask(umask);
    await s3.client.send(new DeleteObjectCommand({ Bucket: MODELS, Key: 'modes/shared.safetensors' }));
    await s3.client.send(new DeleteObjectCommand({ Bucket: MODELS, Key: 'modes/old.safetensors' }));
  }
  const models = path.join(into, 'mnt/sfs/models');
  const mode = (p: string) => (fs.statSync(path.join(models, p)).mode & 0o777).toString(8);
  assert.is(mode('modes/shared.safetensors'), '640', 'the recorded mode');
  assert.is(mode('modes/old.safetensors'), '644', 'unknown: 0644');
  assert.is(mode('modes'), '755');
  assert.is(mode('checkpoints/sd_xl_base.safetensors'), '644', 'the mode backup-verda recorded');
  assert.is(mode('checkpoints'), '755');
});

test('backup-verda records each model mode in R2', async () => {
  const head = await s3.headObject(MODELS, 'checkpoints/sd_xl_base.safetensors');
  assert.is(head?.metadata.mode, '644');
});

test.run();
