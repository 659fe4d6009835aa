// backup-verda.mts against a real sshd on loopback (the fixture Verda), a real S3 server and a
// real podman image: every artifact restores with the SPEC's command to what it was taken from.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { DeleteObjectCommand } from '@aws-sdk/client-s3';
import {
  runScript,
  s3Env,
  sha256,
  startS3,
  tempDir,
  writeRandomFile,
  type RunResult,
  type S3Server,
} from './helpers.ts';
import { startSshd, type Sshd } from './sshd.ts';
import { ENV_SECRET, ODD, makeVerda, type VerdaFixture } from './verda-fixture.ts';

const MODELS = 'comfy-multi-model-vault-backup';
const CACHE = 'comfy-multi-cache';
const IMAGE = `comfy-multi-worker-test-${process.pid}`;
const MiB = 1024 * 1024;

let s3: S3Server;
let sshd: Sshd;
let verda: VerdaFixture;
let work: string;
let backupDir: string;
let env: Record<string, string>;
const outputs: RunResult[] = [];

function sh(cmd: string, args: string[], input?: Buffer) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', input, maxBuffer: 256 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

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

async function backup(args: string[], extra: Record<string, string> = {}) {
  const r = await runScript('backup-verda.mts', args, { ...env, ...extra });
  outputs.push(r);
  return r;
}

/** Every entry under root (files, dirs, symlinks): type, mode, content digest and mtime. */
function snapshot(root: string, keep: (rel: string) => boolean = () => true): Record<string, string> {
  const out: Record<string, string> = {};
  const visit = (dir: string, rel: string) => {
    for (const name of fs.readdirSync(dir)) {
      const r = rel ? `${rel}/${name}` : name;
      if (!keep(r)) continue;
      const full = path.join(dir, name);
      const st = fs.lstatSync(full);
      const mode = (st.mode & 0o7777).toString(8);
      if (st.isDirectory()) {
        out[r] = `dir ${mode}`;
        visit(full, r);
      } else if (st.isFile()) out[r] = `file ${mode} ${sha256(fs.readFileSync(full))} ${Math.floor(st.mtimeMs / 1000)}`;
      else if (st.isSymbolicLink()) out[r] = `link ${fs.readlinkSync(full)}`;
    }
  };
  visit(root, '');
  return out;
}

/** Extracts an artifact with the SPEC's restore command into a fresh root; returns that root. */
function restore(file: string, into: string): string {
  const root = tempDir('restore');
  const dest = path.join(root, into);
  fs.mkdirSync(dest, { recursive: true });
  sh('tar', ['-xzf', file, '-C', dest]);
  return root;
}

function newest(kind: string): string {
  const names = fs
    .readdirSync(backupDir)
    .filter((n) => new RegExp(`^${kind}-\\d{8}-\\d{6}\\.tar\\.gz$`).test(n))
    .sort();
  assert.ok(names.length, `an artifact ${kind}`);
  return path.join(backupDir, names[names.length - 1]);
}

function manifests(): string[] {
  return fs
    .readdirSync(backupDir)
    .filter((n) => /^manifest-\d{8}-\d{6}\.json$/.test(n))
    .sort();
}

const puts = (from: number) =>
  s3.requests
    .slice(from)
    .filter((q) => q.method === 'PUT')
    .map((q) => decodeURIComponent(q.url.split('?')[0]));

test.before(async () => {
  s3 = await startS3([MODELS, CACHE]);
  sshd = await startSshd(['verda']);
  // `nohost` points at a port nothing listens on.
  fs.appendFileSync(sshd.config, `\nHost nohost\n  HostName 127.0.0.1\n  Port 9\n`);
  work = tempDir('verda');
  verda = makeVerda(path.join(work, 'verda'));
  backupDir = path.join(work, 'mello/backups/verda');
  importImage('image v1');
  env = {
    ...s3Env(s3, path.join(work, 'state')),
    ...verda.env,
    VERDA_HOST: 'verda',
    SSH_CONFIG: sshd.config,
    BACKUP_DIR: backupDir,
    CONTAINER_CLI: 'podman',
    CONTAINER_IMAGE: IMAGE,
    KEEP_BACKUPS: '2',
  };
});

test.after(async () => {
  spawnSync('podman', ['rmi', '--force', IMAGE]);
  await s3.stop();
  await sshd.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

test('a model the bash scripts uploaded with aws-cli multipart is adopted, not sent again', async () => {
  // Pre-upload unet/big.safetensors as aws-cli did: 8 MiB parts, no sha256 metadata.
  const key = 'unet/big.safetensors';
  await s3.uploadLikeAwsCli(MODELS, key, fs.readFileSync(path.join(verda.models, key)));

  const connectionsBefore = sshd.connections();
  const before = s3.requests.length;
  const r = await backup(['--json']);
  assert.is(r.code, 0, r.stdout + r.stderr);
  const sent = puts(before);
  assert.not.ok(
    sent.some((u) => u.includes('unet/big.safetensors')),
    'no body sent for the adopted model',
  );
  assert.ok(
    sent.some((u) => u.includes('sd_xl_base.safetensors')),
    'the other models are sent',
  );
  const summary = JSON.parse(r.stdout);
  const modelsStep = summary.steps.find((s: { name: string }) => s.name.startsWith('Models'));
  assert.is(modelsStep.data.adopted, 1);
  assert.is(sshd.connections() - connectionsBefore, 1, 'one SSH connection for the whole run');
});

/**
 * Whether GNU tar's `--exclude=X` (its default matching, as the bash original used it) drops the
 * member `r`: X's components appear in r's at any depth, and r is that or below it.
 */
function excludedAtAnyDepth(r: string, excludes: string[]): boolean {
  return excludes.some((x) => `/${r}/`.includes(`/${x}/`));
}

test('each config artifact restores with the SPEC command to its source: contents, modes, mtimes', async () => {
  const sys = verda.sysroot;
  const cases: { kind: string; into: string; from: string; keep?: (rel: string) => boolean }[] = [
    { kind: 'tailscale-identity', into: 'var/lib', from: path.join(sys, 'var/lib') },
    {
      kind: 'ssh-host-keys',
      into: '',
      from: sys,
      keep: (r) => r === 'etc' || r === 'etc/ssh' || r.startsWith('etc/ssh/ssh_host_'),
    },
    {
      kind: 'fail2ban',
      into: '',
      from: sys,
      keep: (r) =>
        ['etc', 'etc/fail2ban', 'etc/fail2ban/jail.local'].includes(r) || r.startsWith('etc/fail2ban/jail.d'),
    },
    {
      kind: 'ufw',
      into: '',
      from: sys,
      keep: (r) => ['etc', 'etc/ufw', 'etc/ufw/user.rules', 'etc/ufw/user6.rules'].includes(r),
    },
    { kind: 'project-env', into: 'home/dev/comfy-multi', from: verda.project, keep: (r) => r === '.env' },
    {
      kind: 'ohmyzsh-custom',
      into: 'home/dev/.oh-my-zsh',
      from: path.join(verda.home, '.oh-my-zsh'),
      keep: (r) => r === 'custom' || r.startsWith('custom/'),
    },
    {
      kind: 'home-dev',
      into: 'home/dev',
      from: verda.home,
      keep: (r) =>
        !excludedAtAnyDepth(r, [
          '.cache',
          '.local/share',
          '.npm',
          '.docker',
          'comfy-multi/data/models',
          'comfy-multi/data/outputs',
        ]) && !r.split('/').some((c) => c.endsWith('.safetensors')),
    },
    {
      kind: 'comfy-project',
      into: 'home/dev/comfy-multi',
      from: verda.project,
      keep: (r) => !excludedAtAnyDepth(r, ['data/models', 'data/outputs', 'node_modules', '__pycache__']),
    },
  ];
  for (const c of cases) {
    const file = newest(c.kind);
    assert.is((fs.statSync(file).mode & 0o777).toString(8), '600', `${c.kind} is 0600`);
    const root = restore(file, c.into);
    const got = snapshot(
      path.join(root, c.into),
      c.kind === 'tailscale-identity' ? (r) => r.startsWith('tailscale') : undefined,
    );
    const want = snapshot(
      c.from,
      c.kind === 'tailscale-identity' ? (r) => r === 'tailscale' || r.startsWith('tailscale/') : c.keep,
    );
    // The archive's top directory (`.` or the -C base) is not an entry of its own here.
    assert.equal(got, want, `${c.kind} restores to its source`);
    fs.rmSync(root, { recursive: true });
  }
  assert.is((fs.statSync(backupDir).mode & 0o777).toString(8), '700');
  // Names are the SPEC's layouts.
  assert.ok(
    sh('tar', ['-tzf', newest('home-dev')])
      .split('\n')
      .every((n) => !n || n.startsWith('./')),
  );
  assert.ok(
    sh('tar', ['-tzf', newest('tailscale-identity')])
      .split('\n')
      .every((n) => !n || n.startsWith('tailscale')),
  );
  const odd = sh('tar', ['-tzf', newest('comfy-project')]);
  for (const n of ODD.filter((n) => !n.includes('\n'))) assert.ok(odd.includes(`./odd/${n}`), `odd name ${n}`);
  assert.not.ok(fs.existsSync(path.join(verda.project, 'odd/PWNED')));
  assert.not.ok(fs.existsSync(path.join(verda.project, 'PWNED')));
});

test('tailscale-ip.txt and the manifest list every artifact with its bytes and sha256', async () => {
  assert.is(fs.readFileSync(path.join(backupDir, 'tailscale-ip.txt'), 'utf8'), 'unknown\n'); // no tailscale here
  const m = JSON.parse(fs.readFileSync(path.join(backupDir, manifests().pop()!), 'utf8'));
  assert.ok(m.complete);
  const names = m.artifacts.map((a: { name: string }) => a.name);
  for (const kind of [
    'tailscale-identity',
    'ssh-host-keys',
    'fail2ban',
    'ufw',
    'project-env',
    'home-dev',
    'comfy-project',
    'ohmyzsh-custom',
  ]) {
    assert.ok(
      names.some((n: string) => n.startsWith(`${kind}-`)),
      kind,
    );
  }
  assert.ok(names.includes('worker-image.tar.gz'));
  for (const a of m.artifacts) {
    const data = fs.readFileSync(path.join(backupDir, a.name));
    assert.is(a.bytes, data.length, a.name);
    assert.is(a.sha256, sha256(data), a.name);
  }
  const keys = m.r2.map((o: { key: string }) => o.key);
  assert.ok(keys.includes('verda-config-backup.tar.gz'));
  assert.ok(keys.includes('unet/big.safetensors'));
});

test('worker-image.tar.gz loads with podman load, and R2 holds the same bytes', async () => {
  const file = path.join(backupDir, 'worker-image.tar.gz');
  const id = sh('podman', ['image', 'inspect', '--format', '{{.Id}}', IMAGE]).trim();
  // `docker load < F` reads gzip itself; Debian's podman 4.3 fails on any gzipped docker-archive
  // ("loading tar component manifest.json: unexpected EOF", with system gzip too), so the test
  // gunzips first: the same bytes, and a whole archive or gunzip fails.
  const loaded = sh('sh', ['-c', 'gunzip -c "$1" | podman load', 'sh', file]);
  assert.match(loaded, /Loaded image/);
  assert.ok(loaded.includes(id) || loaded.includes(IMAGE), loaded);
  const inR2 = await s3.readObject(CACHE, 'worker-image.tar.gz');
  assert.is(sha256(inR2), sha256(fs.readFileSync(file)));
});

test('R2 holds the config bundle, its dated copy and every model byte for byte', async () => {
  const bundle = await s3.readObject(CACHE, 'verda-config-backup.tar.gz');
  const dated = await s3.listKeys(CACHE, 'verda-config-backups/');
  assert.is(dated.length, 1);
  assert.ok((await s3.readObject(CACHE, dated[0])).equals(bundle));
  const dir = tempDir('bundle');
  sh('tar', ['-xzf', '-', '-C', dir], bundle);
  for (const name of fs.readdirSync(dir))
    assert.ok(fs.readFileSync(path.join(dir, name)).equals(fs.readFileSync(path.join(backupDir, name))), name);
  assert.ok(fs.readdirSync(dir).includes('tailscale-ip.txt'));
  assert.not.ok(fs.readdirSync(dir).includes('worker-image.tar.gz'));
  fs.rmSync(dir, { recursive: true });
  const keys = await s3.listKeys(MODELS);
  assert.equal(keys, ['checkpoints/sd_xl_base.safetensors', 'loras/my lora $(x).safetensors', 'unet/big.safetensors']);
  for (const key of keys) {
    assert.is(sha256(await s3.readObject(MODELS, key)), sha256(fs.readFileSync(path.join(verda.models, key))), key);
  }
  assert.equal(s3.openUploads(MODELS), []);
  assert.equal(s3.openUploads(CACHE), []);
});

test('a second full run sends no model and no image', async () => {
  await new Promise((r) => setTimeout(r, 1100)); // a new timestamp
  const before = s3.requests.length;
  const imageMtime = fs.statSync(path.join(backupDir, 'worker-image.tar.gz')).mtimeMs;
  const r = await backup([]);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /unchanged since the last backup/);
  const sent = puts(before);
  assert.equal(
    sent.filter((u) => u.includes(MODELS) || u.includes('worker-image')),
    [],
  );
  assert.is(sent.length, 2, `only the bundle and its dated copy: ${sent}`);
  assert.is(fs.statSync(path.join(backupDir, 'worker-image.tar.gz')).mtimeMs, imageMtime);
});

test('--quick touches neither models nor the image', async () => {
  await new Promise((r) => setTimeout(r, 1100));
  fs.writeFileSync(path.join(verda.models, 'checkpoints/new.safetensors'), 'new model');
  const newId = importImage('image v2');
  const before = s3.requests.length;
  const r = await backup(['--quick']);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /skipped \(--quick\)/);
  assert.equal(
    puts(before).filter((u) => u.includes(MODELS) || u.includes('worker-image')),
    [],
  );
  assert.is(await s3.headObject(MODELS, 'checkpoints/new.safetensors'), undefined);
  assert.is.not(fs.readFileSync(path.join(backupDir, 'worker-image.id'), 'utf8').trim(), newId);
});

test('a changed image is saved and sent again; a new model alone is sent', async () => {
  await new Promise((r) => setTimeout(r, 1100));
  const before = s3.requests.length;
  const r = await backup([]);
  assert.is(r.code, 0, r.stdout + r.stderr);
  const sent = puts(before);
  assert.ok(sent.some((u) => u.endsWith('/worker-image.tar.gz')));
  assert.equal(
    sent.filter((u) => u.includes(MODELS)),
    [`/${MODELS}/checkpoints/new.safetensors`],
  );
  const id = sh('podman', ['image', 'inspect', '--format', '{{.Id}}', IMAGE]).trim();
  assert.is(fs.readFileSync(path.join(backupDir, 'worker-image.id'), 'utf8').trim(), id);
  assert.is(
    sha256(await s3.readObject(CACHE, 'worker-image.tar.gz')),
    sha256(fs.readFileSync(path.join(backupDir, 'worker-image.tar.gz'))),
  );
});

test('the long steps say where they stand: dated stats lines every STATS_INTERVAL without a terminal, bytes, rate, ETA, the file', async () => {
  await new Promise((r) => setTimeout(r, 1100));
  const model = path.join(verda.models, 'checkpoints/progress.safetensors');
  writeRandomFile(model, 24 * 1024 * 1024);
  try {
    const r = await backup([], { STATS_INTERVAL: '0.1' });
    assert.is(r.code, 0, r.stdout + r.stderr);
    const stats =
      /^ {2}\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] models sent from Verda: \S+ of \S+ \(\d+%\), \S+\/s, ETA [\d:-]+; checkpoints\/progress\.safetensors \S+ of 24M$/m;
    assert.match(r.stdout, stats, r.stdout);
    // The header and the summary carry the date and time.
    assert.match(r.stdout, /^=== Verda → Mello and R2 \(full\), \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ===$/m);
    assert.match(r.stdout, /^=== Backup complete in [\d.]+s: .*, ended \d{4}-\d\d-\d\d \d\d:\d\d:\d\d ===$/m);
    assert.not.match(r.stderr, /Warning|warning/);
  } finally {
    fs.rmSync(model);
  }
});

test('rotation keeps KEEP_BACKUPS dated copies of each kind, on Mello and in R2', async () => {
  assert.is(manifests().length, 2);
  for (const kind of ['home-dev', 'tailscale-identity', 'comfy-project']) {
    assert.is(fs.readdirSync(backupDir).filter((n) => n.startsWith(`${kind}-`)).length, 2, kind);
  }
  assert.is((await s3.listKeys(CACHE, 'verda-config-backups/')).length, 2);
});

test('--dry-run says what it would do and changes nothing', async () => {
  await new Promise((r) => setTimeout(r, 1100));
  fs.writeFileSync(path.join(verda.models, 'checkpoints/dry.safetensors'), 'dry model');
  const listing = fs.readdirSync(backupDir).sort();
  const before = s3.requests.length;
  const r = await backup(['--dry-run']);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, `would send r2://${MODELS}/checkpoints/dry.safetensors`);
  assert.match(r.stdout, /would write home-dev-/);
  assert.equal(fs.readdirSync(backupDir).sort(), listing);
  assert.equal(puts(before), []);
  fs.rmSync(path.join(verda.models, 'checkpoints/dry.safetensors'));
});

test('an unreachable Verda is exit 1 within the connect timeout, naming it', async () => {
  const started = Date.now();
  const r = await backup(['--quick'], { VERDA_HOST: 'nohost' });
  assert.is(r.code, 1);
  assert.match(r.stdout, /cannot reach nohost/);
  assert.ok(Date.now() - started < 20_000, `${Date.now() - started} ms`);
  assert.not.match(r.stdout + r.stderr, /\n\s+at /);
  // It made nothing: no manifest (a manifest is a restore point, and this run is none).
  assert.is(manifests().length, 2, 'no manifest for a run that made no archive');
  assert.is((await s3.listKeys(CACHE, 'verda-config-backups/')).length, 2, 'not rotated after a failed run');
});

test('--verify checks the newest manifest: a corrupted artifact and a deleted object are named', async () => {
  await new Promise((r) => setTimeout(r, 1100));
  const good = await backup(['--quick']);
  assert.is(good.code, 0, good.stdout + good.stderr);
  const ok = await backup(['--verify']);
  assert.is(ok.code, 0, ok.stdout + ok.stderr);
  const before = s3.requests.length;
  const home = newest('home-dev');
  const original = fs.readFileSync(home);
  fs.writeFileSync(home, Buffer.concat([original.subarray(0, 20), Buffer.alloc(original.length - 20)]));
  await s3.client.send(new DeleteObjectCommand({ Bucket: CACHE, Key: 'verda-config-backup.tar.gz' }));
  const bad = await backup(['--verify']);
  assert.is(bad.code, 1);
  assert.match(bad.stdout, `differs: ${path.basename(home)}`);
  assert.match(bad.stdout, `missing: r2://${CACHE}/verda-config-backup.tar.gz`);
  assert.equal(puts(before), [], 'verify changes nothing');
  fs.writeFileSync(home, original);
});

test('--verify --deep reads objects back and names altered bytes', async () => {
  const m = JSON.parse(fs.readFileSync(path.join(backupDir, manifests().pop()!), 'utf8'));
  const dated = m.r2.find((o: { key: string }) => o.key.startsWith('verda-config-backups/')).key;
  const stored = path.join(s3.dir, CACHE, `${dated}._S3rver_object`);
  const size = fs.statSync(stored).size;
  fs.writeFileSync(stored, Buffer.alloc(size, 1));
  const r = await backup(['--verify', '--deep']);
  assert.is(r.code, 1);
  assert.match(r.stdout, `differs: r2://${CACHE}/${dated} bytes read back`);
});

test('.env contents and credentials never appear in any output', async () => {
  const r = await backup(['--quick', '--verbose', '--json']);
  outputs.push(r);
  for (const o of outputs) {
    const all = o.stdout + o.stderr;
    assert.not.ok(all.includes(ENV_SECRET), '.env content in output');
    assert.not.ok(all.includes('project_secret_9'));
    assert.not.ok(all.includes('PRIVATE HOST KEY'));
  }
});

test.run();
