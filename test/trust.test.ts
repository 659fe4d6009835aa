// Trust between the machines (issue 15): Verda's key on Mello as a forced command (a real sshd
// whose authorized_keys line install wrote), one R2 key pair per bucket (s3rver checking each
// signature, and each key scoped to its bucket as an R2 "Object Read & Write" token is), the
// config bundle age-encrypted before it leaves Mello (checked with the `age` CLI from Debian), and
// a lock on shared storage held by another host.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import zlib from 'node:zlib';
import { decryptStream, encryptStream, loadRecipients, parseAgeRecipients } from '../lib/age.ts';
import { UsageError } from '../lib/cli.ts';
import { bucketTarget, loadConfig } from '../lib/config.ts';
import { runCommand, ROOT, runScript, sha256, startS3, tempDir, writeTree, type S3Server } from './helpers.ts';
import { startSshd, type Sshd } from './sshd.ts';
import { ENV_SECRET, makeVerda, type VerdaFixture } from './verda-fixture.ts';

const MODELS = 'comfy-multi-model-vault-backup';
const CACHE = 'comfy-multi-cache';
const USER_FILES = 'comfy-multi-user-files';
const IMAGE = `comfy-multi-worker-trust-${process.pid}`;
// What the fixture Verda holds that nobody holding only an R2 key may read.
const SECRETS = [ENV_SECRET.split('=')[1], 'project_secret_9', 'PRIVATE HOST KEY', 'PRIVATE RSA KEY', 'privkey:abc'];

// One key pair per bucket, each valid for its bucket only (an R2 API token scoped to one bucket);
// the shared pair is not a key at all, so a request that falls back to it fails.
const KEYS = {
  models: { id: 'MODELS-KEY-ID', secret: 'models-secret-1', bucket: MODELS, vars: 'R2_MODELS' },
  cache: { id: 'CACHE-KEY-ID', secret: 'cache-secret-2', bucket: CACHE, vars: 'R2_CACHE' },
  userFiles: { id: 'USERFILES-KEY-ID', secret: 'userfiles-secret-3', bucket: USER_FILES, vars: 'R2_USER_FILES' },
};
const GLOBAL_INVALID = { R2_ACCESS_KEY_ID: 'GLOBAL-NOT-A-KEY', R2_SECRET_ACCESS_KEY: 'global-not-a-secret' };
const pairEnv = (k: (typeof KEYS)[keyof typeof KEYS]) => ({
  [`${k.vars}_ACCESS_KEY_ID`]: k.id,
  [`${k.vars}_SECRET_ACCESS_KEY`]: k.secret,
});

/** Registers the per-bucket keys with s3rver and refuses each outside its bucket (403 AccessDenied). */
function scopeKeysToBuckets() {
  const require = createRequire(import.meta.url);
  const dir = path.dirname(require.resolve('s3rver/package.json'));
  const AWSAccount = require(path.join(dir, 'lib/models/account.js'));
  const router = require(path.join(dir, 'lib/routes.js'));
  const S3Error = require(path.join(dir, 'lib/models/error.js'));
  const scope = new Map<string, string>();
  for (const k of Object.values(KEYS)) {
    AWSAccount.DUMMY_ACCOUNT.createKeyPair(k.id, k.secret);
    scope.set(k.id, k.bucket);
  }
  const layer = (router.stack as { stack: Function[] }[]).find((l) =>
    l.stack.some((f) => f.name === 'authentication'),
  )!;
  const i = layer.stack.findIndex((f) => f.name === 'authentication');
  const original = layer.stack[i];
  layer.stack[i] = function authentication(
    ctx: { headers: Record<string, unknown>; params: { bucket?: string } },
    next: unknown,
  ) {
    const keyId = /Credential=([^/]+)\//.exec(String(ctx.headers.authorization ?? ''))?.[1];
    const bucket = keyId ? scope.get(keyId) : undefined;
    if (bucket && ctx.params.bucket !== bucket) throw new S3Error('AccessDenied', 'Access Denied', {});
    return original(ctx, next);
  };
}

let s3: S3Server;
let sshd: Sshd;
let work: string;
let verda: VerdaFixture;
let melloHome: string; // the Mello user's HOME: install writes its ~/.ssh/authorized_keys
let melloData: string;
let backupDir: string;
let captureFile: string; // what Verda's models step received on stdin
let ageKey: string; // age-keygen's identity file
let ageRecipient: string;
let verdaEnv: Record<string, string>; // backup-verda on "Mello", VERDA_HOST=local
let cronEnv: Record<string, string>; // backup-cron on "Verda", MELLO_HOST over the loopback sshd

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const nextSecond = () => sleep(1100);

function sh(cmd: string, args: string[], opts: { input?: string | Buffer; env?: NodeJS.ProcessEnv } = {}) {
  // Bounded: an ssh -N that a regression lets forward would otherwise never return.
  const r = spawnSync(cmd, args, {
    input: opts.input,
    env: opts.env ?? process.env,
    maxBuffer: 256 << 20,
    timeout: 30_000,
    killSignal: 'SIGKILL',
  });
  return { code: r.status, stdout: r.stdout ?? Buffer.alloc(0), stderr: (r.stderr ?? Buffer.alloc(0)).toString() };
}

/** A command with exactly this environment (no PATH or HOME added), killed after `timeoutMs`. */
const run = (cmd: string, args: string[], env: Record<string, string>, timeoutMs = 30_000) =>
  runCommand(cmd, args, env, { limitMs: timeoutMs });

const NOBODY = 65534;
const install = (args: string[], home = melloHome) =>
  run(path.join(ROOT, 'install'), args, { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: home });
const ssh = (args: string[]) => sh('ssh', ['-F', sshd.config, '-o', 'BatchMode=yes', ...args]);

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const srv = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

/** A buffer and everything inside it: gzip streams inflated, tar entries opened, recursively. */
function layers(buf: Buffer, depth = 0): Buffer[] {
  const out = [buf];
  if (depth > 5) return out;
  if (buf[0] === 0x1f && buf[1] === 0x8b) {
    try {
      out.push(...layers(zlib.gunzipSync(buf), depth + 1));
    } catch {
      /* not gzip after all */
    }
  } else if (buf.length >= 512 && buf.subarray(257, 262).toString('latin1') === 'ustar') {
    for (let at = 0; at + 512 <= buf.length;) {
      const header = buf.subarray(at, at + 512);
      if (header.every((b) => b === 0)) break;
      const size = parseInt(header.subarray(124, 136).toString('latin1').replace(/\0.*$/s, '').trim() || '0', 8);
      out.push(...layers(buf.subarray(at + 512, at + 512 + size), depth + 1));
      at += 512 + Math.ceil(size / 512) * 512;
    }
  }
  return out;
}

const secretsIn = (buf: Buffer) => SECRETS.filter((s) => layers(buf).some((b) => b.includes(s)));

/** Every object of every bucket: key → bytes. */
async function everyObject(): Promise<Map<string, Buffer>> {
  const all = new Map<string, Buffer>();
  for (const bucket of [MODELS, CACHE, USER_FILES]) {
    for (const key of await s3.listKeys(bucket)) all.set(`${bucket}/${key}`, await s3.readObject(bucket, key));
  }
  return all;
}

function newestManifest() {
  const name = fs
    .readdirSync(backupDir)
    .filter((n) => /^manifest-\d{8}-\d{6}\.json$/.test(n))
    .sort()
    .pop()!;
  return JSON.parse(fs.readFileSync(path.join(backupDir, name), 'utf8'));
}

test.before(async () => {
  work = tempDir('trust');
  s3 = await startS3([MODELS, CACHE, USER_FILES]);
  scopeKeysToBuckets();
  verda = makeVerda(path.join(work, 'verda'));
  melloHome = path.join(work, 'mello home');
  fs.mkdirSync(melloHome, { recursive: true });
  melloData = path.join(work, 'mello-data');
  writeTree(melloData, {
    'user_data/user001/flow.json': '{"nodes":[1]}',
    'inputs/ref.png': 'png',
    'outputs/user001/o.png': 'out',
  });
  backupDir = path.join(work, 'mello-backups');

  // Mello's configuration as the forced command's environment (sshd's SetEnv: backup-mello
  // reads no .env in the checkout): only the user-files pair is valid.
  const melloEnv = {
    MELLO_DATA_DIR: melloData,
    R2_ENDPOINT: s3.endpoint,
    ...GLOBAL_INVALID,
    ...pairEnv(KEYS.userFiles),
    COMFYMULTI_STATE_DIR: path.join(work, 'mello-state'),
  };
  sshd = await startSshd(
    ['mello'],
    [
      `SetEnv ${Object.entries(melloEnv)
        .map(([k, v]) => `${k}=${v}`)
        .join(' ')}`,
    ],
  );

  // Verda's side of the models step: a `node` first on the PATH runs the brought bundle through a
  // wrapper that keeps a copy of what it reads on stdin (the request), and ends when the bundle ends.
  const shims = path.join(work, 'verda-bin');
  fs.mkdirSync(shims);
  captureFile = path.join(work, 'verda-stdin');
  const wrapper = path.join(shims, 'capture.mjs');
  fs.writeFileSync(
    wrapper,
    `import { spawn } from 'node:child_process';
import fs from 'node:fs';
const child = spawn(process.execPath, process.argv.slice(2), { stdio: ['pipe', 'inherit', 'inherit'] });
child.stdin.on('error', () => {});
process.stdin.on('data', (d) => { fs.appendFileSync(${JSON.stringify(captureFile)}, d); child.stdin.write(d); });
process.stdin.on('end', () => child.stdin.end());
child.on('exit', (code) => process.exit(code ?? 1));
`,
  );
  const node = JSON.stringify(process.execPath);
  fs.writeFileSync(
    path.join(shims, 'node'),
    [
      '#!/bin/sh',
      'case "$1" in',
      `  */comfymulti-verda.*/verda.mjs) exec ${node} ${JSON.stringify(wrapper)} "$@" ;;`,
      `  *) exec ${node} "$@" ;;`,
      'esac',
      '',
    ].join('\n'),
    { mode: 0o755 },
  );

  // A worker image for the full run (podman import of a one-file root).
  const rootfs = path.join(work, 'rootfs');
  writeTree(rootfs, { 'etc/motd': 'trust image' });
  const tarball = path.join(work, 'rootfs.tar');
  assert.is(sh('tar', ['-C', rootfs, '-cf', tarball, '.']).code, 0);
  const imported = sh('podman', ['import', '--quiet', tarball, IMAGE]);
  assert.is(imported.code, 0, imported.stderr);

  ageKey = path.join(work, 'age-key.txt');
  const keygen = sh('age-keygen', ['-o', ageKey]);
  assert.is(keygen.code, 0, keygen.stderr);
  ageRecipient = sh('age-keygen', ['-y', ageKey]).stdout.toString().trim();

  verdaEnv = {
    ...verda.env,
    PATH: `${shims}:${verda.env.PATH ?? process.env.PATH}`,
    VERDA_HOST: 'local',
    BACKUP_DIR: backupDir,
    R2_ENDPOINT: s3.endpoint,
    ...GLOBAL_INVALID,
    ...pairEnv(KEYS.models),
    ...pairEnv(KEYS.cache),
    CONTAINER_CLI: 'podman',
    CONTAINER_IMAGE: IMAGE,
    KEEP_BACKUPS: '2',
    COMFYMULTI_STATE_DIR: path.join(work, 'verda-run-state'),
    // A hang fails the test in a minute, not the production ten.
    COMFYMULTI_COMMAND_TIMEOUT: '60',
  };
  cronEnv = {
    ...verda.env,
    MELLO_HOST: 'mello',
    SSH_CONFIG: sshd.config,
    MELLO_SCRIPTS_DIR: ROOT,
    COMFYMULTI_STATE_DIR: path.join(work, 'cron-state'),
  };
});

test.after(async () => {
  spawnSync('podman', ['rmi', '--force', IMAGE]);
  await s3.stop();
  await sshd.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

// --- The forced command -------------------------------------------------------------------------

test("install --mello-trigger-key writes one forced-command line per key, replaces that key's line, keeps the others; 0600 in 0700", async () => {
  const home = path.join(work, 'install-home');
  fs.mkdirSync(path.join(home, '.ssh'), { recursive: true, mode: 0o755 });
  const pub = fs.readFileSync(path.join(sshd.dir, 'user_key.pub'), 'utf8').trim();
  const [type, blob] = pub.split(' ');
  const other = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFpne+vQc8TMomdBQ1B1rd9iEifX4hfzCHes60ds47v0 admin@laptop';
  const keys = path.join(home, '.ssh/authorized_keys');
  fs.writeFileSync(keys, `# the admin's keys\n${other}\nfrom="10.0.0.1",no-pty ${type} ${blob} old line\n`, {
    mode: 0o644,
  });
  const pubFile = path.join(work, 'verda key.pub');
  fs.writeFileSync(pubFile, `${type} ${blob} root@verda\n`);

  const r = await install(['--mello-trigger-key', pubFile], home);
  assert.is(r.code, 0, r.stdout + r.stderr);
  const line = `restrict,command="'${ROOT}/lib/mello-trigger.sh'" ${type} ${blob} root@verda`;
  assert.is(fs.readFileSync(keys, 'utf8'), `# the admin's keys\n${other}\n${line}\n`);
  assert.match(r.stdout, line, 'install shows the line it wrote');
  assert.is(fs.statSync(keys).mode & 0o777, 0o600);
  assert.is(fs.statSync(path.join(home, '.ssh')).mode & 0o777, 0o700);

  const again = await install(['--mello-trigger-key', pubFile], home);
  assert.is(again.code, 0, again.stderr);
  assert.is(fs.readFileSync(keys, 'utf8'), `# the admin's keys\n${other}\n${line}\n`, 'a second run changes nothing');
  assert.equal(fs.readdirSync(path.join(home, '.ssh')), ['authorized_keys'], 'no temporary file left');

  // No ~/.ssh at all: created 0700.
  const fresh = path.join(work, 'fresh-home');
  fs.mkdirSync(fresh);
  assert.is((await install(['--mello-trigger-key', pubFile], fresh)).code, 0);
  assert.is(fs.readFileSync(path.join(fresh, '.ssh/authorized_keys'), 'utf8'), `${line}\n`);
  assert.is(fs.statSync(path.join(fresh, '.ssh')).mode & 0o777, 0o700);

  // --uninstall removes that line only.
  const un = await install(['--uninstall', '--mello-trigger-key', pubFile], home);
  assert.is(un.code, 0, un.stderr);
  assert.is(fs.readFileSync(keys, 'utf8'), `# the admin's keys\n${other}\n`);
});

test('install --mello-trigger-key with an authorized_keys it cannot read: exit 1 naming it, the file kept whole', async () => {
  // As nobody, in a ~/.ssh it owns, over an authorized_keys of root's, 0600: unreadable but replaceable.
  const home = fs.mkdtempSync(path.join(os.tmpdir(), 'cms-unreadable-home-'));
  try {
    fs.mkdirSync(path.join(home, '.ssh'), { mode: 0o700 });
    fs.chownSync(home, NOBODY, NOBODY);
    fs.chownSync(path.join(home, '.ssh'), NOBODY, NOBODY);
    const keys = path.join(home, '.ssh/authorized_keys');
    const before = 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFpne+vQc8TMomdBQ1B1rd9iEifX4hfzCHes60ds47v0 admin@laptop\n';
    fs.writeFileSync(keys, before, { mode: 0o600 });
    const pubFile = path.join(home, 'verda.pub');
    fs.writeFileSync(pubFile, fs.readFileSync(path.join(sshd.dir, 'user_key.pub')), { mode: 0o644 });
    const r = await runCommand(
      path.join(ROOT, 'install'),
      ['--mello-trigger-key', pubFile],
      { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: home },
      { asUser: NOBODY, cwd: home },
    );
    assert.is(r.code, 1, r.stdout + r.stderr);
    assert.match(r.stderr, /cannot read .*authorized_keys/);
    assert.is(fs.readFileSync(keys, 'utf8'), before, "the admin's keys are all still there");
    assert.equal(fs.readdirSync(path.join(home, '.ssh')), ['authorized_keys'], 'no temporary file left');
  } finally {
    fs.rmSync(home, { recursive: true, force: true });
  }
});

test('install --mello-trigger-key refuses a private key, a non-key, two keys and a missing file (exit 2), writing nothing', async () => {
  const home = path.join(work, 'refuse-home');
  fs.mkdirSync(home);
  const file = path.join(work, 'not-a-key');
  for (const [content, said] of [
    [fs.readFileSync(path.join(sshd.dir, 'user_key'), 'utf8'), 'private key'],
    ['from="1.2.3.4" ssh-ed25519 AAAA x\n', 'not an OpenSSH public key'],
    ['ssh-ed25519 AAAA$(id) x\n', 'not base64'],
    ['ssh-ed25519 AAAA a\nssh-ed25519 BBBB b\n', 'more than one line'],
    ['ssh-ed25519 AAAAnotakey x\n', 'ssh-keygen does not read'],
  ]) {
    fs.writeFileSync(file, content);
    const r = await install(['--mello-trigger-key', file], home);
    assert.is(r.code, 2, `${said}: ${r.stdout}${r.stderr}`);
    assert.match(r.stderr, said);
  }
  const missing = await install(['--mello-trigger-key', path.join(work, 'nope.pub')], home);
  assert.is(missing.code, 2);
  assert.match(missing.stderr, 'not a readable file');
  assert.not.ok(fs.existsSync(path.join(home, '.ssh/authorized_keys')));
});

test('backup-cron triggers backup-mello through the forced command (per-bucket user-files key on Mello)', async () => {
  const r0 = await install(['--mello-trigger-key', path.join(sshd.dir, 'user_key.pub')]);
  assert.is(r0.code, 0, r0.stdout + r0.stderr);
  // The sshd reads the Mello user's authorized_keys, as install wrote it: the only line, forced.
  const keys = path.join(melloHome, '.ssh/authorized_keys');
  assert.match(fs.readFileSync(keys, 'utf8'), /^restrict,command="'[^']+\/lib\/mello-trigger\.sh'" ssh-ed25519 \S+/);
  fs.rmSync(path.join(sshd.dir, 'authorized_keys'));
  fs.symlinkSync(keys, path.join(sshd.dir, 'authorized_keys'));

  const r = await runScript('backup-cron.mts', ['--verbose'], cronEnv);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /mello: Step 1: User data/);
  assert.match(r.stdout, /✓ backup-mello on mello: === Backup complete/);
  assert.is((await s3.readObject(USER_FILES, 'outputs/user001/o.png')).toString(), 'out');

  // --verify --deep --full: every flag backup-cron sends is on the allow-list.
  const v = await runScript('backup-cron.mts', ['--verify', '--deep'], cronEnv);
  assert.is(v.code, 0, v.stdout + v.stderr);
  assert.match(v.stdout, /✓ backup-mello on mello: === Verify complete/);
  const q = await runScript('backup-cron.mts', ['--quick', '-v'], cronEnv);
  assert.is(q.code, 0, q.stdout + q.stderr);
  assert.match(q.stdout, /mello: === Mello user files → R2 \(quick/);
});

test('the same key cannot run id, pass --env-file or any other flag, chain a command, or substitute one: exit 2, refused', async () => {
  const marker = path.join(work, 'PWNED');
  for (const [command, said] of [
    ['id', '"id" is not a flag'],
    ['--env-file /etc/shadow', 'flag "--env-file" is not allowed'],
    ['; id', '";" is not a flag'],
    [`--full; touch ${marker}`, 'flag "--full;" is not allowed'],
    [`--quick $(touch ${marker})`, '"$(touch" is not a flag'],
    [`\`touch ${marker}\``, 'is not a flag'],
    ['backup-mello.mts --json', 'flag "--json" is not allowed'],
    ['backup-mello.mts --quick --dry-run', 'flag "--dry-run" is not allowed'],
    ['/bin/sh -c id', '"/bin/sh" is not a flag'],
    [`cat ${path.join(melloHome, '.ssh/authorized_keys')}`, '"cat" is not a flag'],
  ]) {
    const r = ssh(['--', 'mello', command]);
    assert.is(r.code, 2, `${command}: ${r.stdout}${r.stderr}`);
    assert.match(r.stderr, 'refused', command);
    assert.match(r.stderr, said, command);
    assert.not.match(r.stdout.toString(), /uid=|restrict,command/, `${command} ran`);
  }
  assert.not.ok(fs.existsSync(marker), 'nothing was run');
  const sftp = sh('sftp', ['-F', sshd.config, '-o', 'BatchMode=yes', '-b', '-', 'mello'], { input: 'ls /\n' });
  assert.ok(sftp.code !== 0, 'no sftp');
  assert.not.match(sftp.stdout.toString(), /etc/);
  const scp = sh('scp', [
    '-O',
    '-F',
    sshd.config,
    '-o',
    'BatchMode=yes',
    `mello:${path.join(melloHome, '.ssh/authorized_keys')}`,
    path.join(work, 'stolen'),
  ]);
  assert.ok(scp.code !== 0, 'no scp');
  assert.not.ok(fs.existsSync(path.join(work, 'stolen')));
});

test('the same key cannot forward ports: -L, -R and -W are refused by the server', async () => {
  // -L: the tunnel to Mello's S3 listens here, but Mello refuses each connection through it.
  const local = await freePort();
  const tunnel = spawn(
    'ssh',
    [
      '-F',
      sshd.config,
      '-o',
      'BatchMode=yes',
      '-o',
      'LogLevel=INFO',
      '-N',
      '-L',
      `127.0.0.1:${local}:127.0.0.1:${s3.port}`,
      'mello',
    ],
    {
      stdio: ['ignore', 'ignore', 'pipe'],
    },
  );
  let said = '';
  tunnel.stderr.on('data', (d) => (said += d));
  try {
    let answer: string | undefined;
    for (let i = 0; i < 100 && answer === undefined; i++) {
      answer = await new Promise<string | undefined>((resolve) => {
        const c = net.connect(local, '127.0.0.1', () => c.write('GET / HTTP/1.0\r\n\r\n'));
        let got = '';
        c.on('data', (d) => (got += d));
        c.on('close', () => resolve(got));
        c.setTimeout(5000, () => c.destroy()); // a tunnel that holds the connection open: what it said
        // Refused: not listening yet. Reset: the tunnel took it and dropped it (its channel refused).
        c.on('error', (e: NodeJS.ErrnoException) => resolve(e.code === 'ECONNREFUSED' ? undefined : got));
      });
      if (answer === undefined) await sleep(100);
    }
    assert.is(
      answer,
      '',
      `nothing came back through the tunnel (ssh said: ${said || 'nothing'}; exit ${tunnel.exitCode})`,
    );
    for (let i = 0; i < 50 && !/prohibited/.test(said); i++) await sleep(100);
    assert.match(said, /administratively prohibited/);
    assert.match(
      fs.readFileSync(path.join(sshd.dir, 'sshd.log'), 'utf8'),
      `refused local port forward: originator 127.0.0.1`,
    );
  } finally {
    tunnel.kill();
  }
  const remote = sh('ssh', [
    '-F',
    sshd.config,
    '-o',
    'BatchMode=yes',
    '-o',
    'ExitOnForwardFailure=yes',
    '-N',
    '-R',
    '127.0.0.1:0:127.0.0.1:22',
    'mello',
  ]);
  assert.is(remote.code, 255, remote.stderr);
  assert.match(remote.stderr, /forwarding failed/);
  const stdio = ssh(['-W', `127.0.0.1:${s3.port}`, 'mello']);
  assert.is(stdio.code, 255, stdio.stderr);
  assert.match(stdio.stderr, /forwarding failed|prohibited/);
});

// --- One key pair per bucket --------------------------------------------------------------------

test('per-bucket keys: with the shared pair invalid, backup-verda (full) works; Verda receives the models pair only', async () => {
  const r = await runScript('backup-verda.mts', ['--verbose'], verdaEnv);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.ok((await s3.listKeys(MODELS)).includes('checkpoints/sd_xl_base.safetensors'));
  assert.ok((await s3.listKeys(CACHE)).includes('verda-config-backup.tar.gz'));

  const received = fs.readFileSync(captureFile, 'utf8');
  const { call, request } = JSON.parse(received.split('\n')[0]);
  assert.is(call, 'backup-models');
  assert.equal(request.target, {
    bucket: MODELS,
    endpoint: s3.endpoint,
    accessKeyId: KEYS.models.id,
    secretAccessKey: KEYS.models.secret,
    // The names of the variables in use (never values): Verda's errors name the pair to fix.
    variables: {
      bucket: 'R2_MODELS_BUCKET',
      endpoint: 'R2_ENDPOINT',
      ownEndpoint: 'R2_MODELS_ENDPOINT',
      accessKeyId: 'R2_MODELS_ACCESS_KEY_ID',
      secretAccessKey: 'R2_MODELS_SECRET_ACCESS_KEY',
    },
  });
  for (const other of [
    KEYS.cache.id,
    KEYS.cache.secret,
    KEYS.userFiles.id,
    KEYS.userFiles.secret,
    ...Object.values(GLOBAL_INVALID),
  ]) {
    assert.not.ok(received.includes(other), `Verda never sees ${other}`);
  }
  // The control for the encryption tests below: without AGE_RECIPIENTS the bundle in R2 is plaintext.
  assert.equal(secretsIn(await s3.readObject(CACHE, 'verda-config-backup.tar.gz')), SECRETS);
});

test("a bucket's key used on another bucket is refused at the server (the scoping the tests rely on)", async () => {
  await nextSecond();
  const env = { ...verdaEnv, R2_CACHE_ACCESS_KEY_ID: KEYS.models.id, R2_CACHE_SECRET_ACCESS_KEY: KEYS.models.secret };
  const r = await runScript('backup-verda.mts', ['--quick'], env);
  assert.is(r.code, 1, r.stdout + r.stderr);
  assert.match(r.stdout, /403/);
});

test('per-bucket keys: half a pair is exit 2 naming the missing half; each pair falls back to R2_*, then AWS_*', () => {
  const dir = tempDir('trust-cfg');
  const load = (env: Record<string, string>) =>
    loadConfig({ HOME: dir, R2_ENDPOINT: 'https://acc.r2.example', ...env }, dir);
  const refuses = (env: Record<string, string>, text: string) => {
    try {
      load(env);
    } catch (e) {
      assert.instance(e, UsageError);
      assert.match((e as Error).message, text);
      return;
    }
    assert.unreachable(`accepted ${JSON.stringify(env)}`);
  };
  refuses({ R2_MODELS_ACCESS_KEY_ID: 'm' }, 'R2_MODELS_SECRET_ACCESS_KEY is not set');
  refuses({ R2_CACHE_SECRET_ACCESS_KEY: 'c' }, 'R2_CACHE_ACCESS_KEY_ID is not set');
  refuses(
    { R2_ACCESS_KEY_ID: 'g', R2_SECRET_ACCESS_KEY: 'g', R2_USER_FILES_ACCESS_KEY_ID: 'u' },
    'R2_USER_FILES_SECRET_ACCESS_KEY',
  );
  const cfg = load({
    R2_ACCESS_KEY_ID: 'g',
    R2_SECRET_ACCESS_KEY: 'gs',
    R2_MODELS_ACCESS_KEY_ID: 'm',
    R2_MODELS_SECRET_ACCESS_KEY: 'ms',
  });
  assert.is(bucketTarget(cfg, 'models').accessKeyId, 'm');
  assert.is(bucketTarget(cfg, 'models').secretAccessKey, 'ms');
  assert.is(bucketTarget(cfg, 'cache').accessKeyId, 'g');
  const aws = load({
    AWS_ACCESS_KEY_ID: 'a',
    AWS_SECRET_ACCESS_KEY: 'as',
    R2_CACHE_ACCESS_KEY_ID: 'c',
    R2_CACHE_SECRET_ACCESS_KEY: 'cs',
  });
  assert.is(bucketTarget(aws, 'userFiles').accessKeyId, 'a');
  assert.is(bucketTarget(aws, 'cache').secretAccessKey, 'cs');
  const none = load({ R2_MODELS_ACCESS_KEY_ID: 'm', R2_MODELS_SECRET_ACCESS_KEY: 'ms' });
  assert.is(bucketTarget(none, 'models').accessKeyId, 'm');
  assert.throws(() => bucketTarget(none, 'cache'), /R2_ACCESS_KEY_ID .*R2_CACHE_ACCESS_KEY_ID/);
  fs.rmSync(dir, { recursive: true });
});

test('a script with half a per-bucket pair is exit 2 naming the variable, before anything is done', async () => {
  const { R2_CACHE_SECRET_ACCESS_KEY: _, ...half } = verdaEnv;
  const r = await runScript('backup-verda.mts', ['--quick'], half);
  assert.is(r.code, 2, r.stdout + r.stderr);
  assert.match(r.stderr, 'R2_CACHE_SECRET_ACCESS_KEY is not set');
  assert.not.ok(r.stderr.includes(KEYS.cache.id) || r.stdout.includes(KEYS.cache.id), 'no credential in the message');
});

// --- Encryption at rest -------------------------------------------------------------------------

test('with AGE_RECIPIENTS the bundle leaves Mello age-encrypted (.age names); the plaintext bundles in R2 are deleted; Mello keeps plaintext 0600', async () => {
  await nextSecond();
  const dry = await runScript('backup-verda.mts', ['--quick', '--dry-run'], {
    ...verdaEnv,
    AGE_RECIPIENTS: ageRecipient,
  });
  assert.is(dry.code, 0, dry.stdout + dry.stderr);
  assert.match(
    dry.stdout,
    /verda-config-backup\.tar\.gz\.age and verda-config-backups\/verda-config-backup-\d{8}-\d{6}\.tar\.gz\.age, age-encrypted/,
  );

  // The plaintext bundles of the points kept are sent again encrypted before they go: those
  // points stay whole (their bundle is in R2, as .age with the plaintext's sha256).
  const r = await runScript('backup-verda.mts', ['--quick'], { ...verdaEnv, AGE_RECIPIENTS: ageRecipient });
  assert.is(r.code, 0, r.stdout + r.stderr);
  const keys = await s3.listKeys(CACHE);
  const m = newestManifest();
  const stamp = m.timestamp;
  assert.ok(keys.includes('verda-config-backup.tar.gz.age'));
  assert.ok(keys.includes(`verda-config-backups/verda-config-backup-${stamp}.tar.gz.age`));
  assert.equal(
    keys.filter((k) => /verda-config-backup.*\.tar\.gz$/.test(k)),
    [],
    'no plaintext bundle left in R2',
  );
  // --status reads the encrypted bundle as the latest one: nothing flagged.
  const status = await runScript('backup-verda.mts', ['--status'], { ...verdaEnv, AGE_RECIPIENTS: ageRecipient });
  assert.is(status.code, 0, status.stdout + status.stderr);
  assert.match(status.stdout, /^  verda-config-backup\.tar\.gz\.age: \S+, sha256 [0-9a-f]{12}$/m);
  assert.match(status.stdout, /newest dated copy: verda-config-backups\/verda-config-backup-\d{8}-\d{6}\.tar\.gz\.age/);

  // The manifest: the objects as stored (ciphertext bytes and sha256), and the plaintext's sha256.
  const bundles = m.r2.filter((o: { key: string }) => o.key.includes('verda-config-backup'));
  assert.is(bundles.length, 2);
  for (const o of bundles) {
    const stored = await s3.readObject(CACHE, o.key);
    assert.is(o.encrypted, 'age');
    assert.is(o.bytes, stored.length);
    assert.is(o.sha256, sha256(stored));
    assert.is((await s3.headObject(CACHE, o.key))!.metadata.sha256, sha256(stored));
    assert.ok(stored.subarray(0, 22).toString() === 'age-encryption.org/v1\n', 'an age file');
    assert.equal(secretsIn(stored), [], `${o.key} holds no readable secret`);
  }
  // Mello's own copies stay plaintext, 0600.
  for (const a of m.artifacts) {
    const file = path.join(backupDir, a.name);
    assert.is(fs.statSync(file).mode & 0o777, 0o600, a.name);
  }
  const env = m.artifacts.find((a: { name: string }) => a.name.startsWith('project-env-'));
  assert.equal(secretsIn(fs.readFileSync(path.join(backupDir, env.name))), [
    ENV_SECRET.split('=')[1],
    'project_secret_9',
  ]);
  assert.equal(
    fs.readdirSync(backupDir).filter((n) => n.startsWith('.')),
    [],
    'no temporary bundle left on Mello',
  );
});

test("what the scripts encrypt, `age -d -i KEY` decrypts to the bundle: the run's artifacts, byte for byte", async () => {
  const m = newestManifest();
  const stored = await s3.readObject(CACHE, 'verda-config-backup.tar.gz.age');
  const d = sh('age', ['-d', '-i', ageKey], { input: stored });
  assert.is(d.code, 0, d.stderr);
  const plain = d.stdout;
  assert.is(
    sha256(plain),
    m.r2.find((o: { key: string }) => o.key === 'verda-config-backup.tar.gz.age').plaintextSha256,
  );
  const list = sh('tar', ['-tzf', '-'], { input: plain });
  assert.is(list.code, 0, list.stderr);
  assert.equal(
    list.stdout.toString().trim().split('\n').sort(),
    m.artifacts.map((a: { name: string }) => a.name).sort(),
  );
  const dir = tempDir('trust-untar');
  assert.is(sh('tar', ['-xzf', '-', '-C', dir], { input: plain }).code, 0);
  for (const a of m.artifacts) assert.is(sha256(fs.readFileSync(path.join(dir, a.name))), a.sha256, a.name);
  fs.rmSync(dir, { recursive: true });
  assert.equal(secretsIn(plain), SECRETS, 'decrypted, the secrets are all there');
});

test('what `age -r` encrypts, decryptStream decrypts (several 64 KiB chunks); a wrong identity or a damaged file is an error, not plaintext', async () => {
  const plain = Buffer.concat([Buffer.from(ENV_SECRET), Buffer.alloc(300_000, 7), Buffer.from('end')]);
  const enc = sh('age', ['-r', ageRecipient], { input: plain });
  assert.is(enc.code, 0, enc.stderr);
  const readAll = async (s: Readable) => {
    const chunks: Buffer[] = [];
    for await (const c of s) chunks.push(Buffer.from(c));
    return Buffer.concat(chunks);
  };
  assert.ok((await readAll(await decryptStream(ageKey, Readable.from([enc.stdout])))).equals(plain));
  // And the other way round through the library's stream, once more for good measure.
  const ours = await readAll(await encryptStream([ageRecipient], Readable.from([plain])));
  assert.ok(sh('age', ['-d', '-i', ageKey], { input: ours }).stdout.equals(plain));

  const otherKey = path.join(work, 'other-age-key.txt');
  sh('age-keygen', ['-o', otherKey]);
  await decryptStream(otherKey, Readable.from([enc.stdout])).then(
    () => assert.unreachable('decrypted with the wrong identity'),
    (e) => assert.match(e.message, 'not encrypted to any identity in AGE_IDENTITY_FILE'),
  );
  const damaged = Buffer.from(enc.stdout);
  damaged[damaged.length - 100] ^= 1;
  await readAll(await decryptStream(ageKey, Readable.from([damaged]))).then(
    () => assert.unreachable('a damaged file decrypted'),
    (e) => assert.ok(e instanceof Error),
  );
  await decryptStream(path.join(work, 'no-such-key'), Readable.from([enc.stdout])).then(
    () => assert.unreachable('no identity file'),
    (e) => assert.match(e.message, 'AGE_IDENTITY_FILE cannot be read'),
  );
});

test('nothing in R2 is readable without the identity: every object of every bucket, unpacked, holds none of the secrets', async () => {
  const all = await everyObject();
  assert.ok(
    [...all.keys()].some((k) => k.includes('worker-image')),
    'the image is among them',
  );
  assert.ok(
    [...all.keys()].some((k) => k.includes('.safetensors')),
    'the models are among them',
  );
  for (const [key, body] of all) assert.equal(secretsIn(body), [], key);
});

test('--verify checks the ciphertext without a key; --verify --deep decrypts with AGE_IDENTITY_FILE, and without it fails naming it', async () => {
  const plainVerify = await runScript('backup-verda.mts', ['--verify'], verdaEnv);
  assert.is(plainVerify.code, 0, plainVerify.stdout + plainVerify.stderr);

  const deep = await runScript('backup-verda.mts', ['--verify', '--deep'], { ...verdaEnv, AGE_IDENTITY_FILE: ageKey });
  assert.is(deep.code, 0, deep.stdout + deep.stderr);
  assert.match(deep.stdout, /2 age-encrypted, decrypted with AGE_IDENTITY_FILE/);

  const without = await runScript('backup-verda.mts', ['--verify', '--deep'], verdaEnv);
  assert.is(without.code, 1, without.stdout + without.stderr);
  assert.match(
    without.stdout,
    /AGE_IDENTITY_FILE is not set: it is needed to decrypt .*r2:\/\/\S+\/verda-config-backup\.tar\.gz\.age/,
  );

  const otherKey = path.join(work, 'other-age-key.txt');
  const wrong = await runScript('backup-verda.mts', ['--verify', '--deep'], {
    ...verdaEnv,
    AGE_IDENTITY_FILE: otherKey,
  });
  assert.is(wrong.code, 1, wrong.stdout + wrong.stderr);
  assert.match(wrong.stdout, /cannot be decrypted with AGE_IDENTITY_FILE: it was not encrypted to any identity/);

  // An object replaced in R2 by other ciphertext (same metadata): --deep sees it.
  const key = 'verda-config-backup.tar.gz.age';
  const head = (await s3.headObject(CACHE, key))!;
  const forged = sh('age', ['-r', ageRecipient], { input: Buffer.alloc(10, 1) }).stdout;
  const { PutObjectCommand } = await import('@aws-sdk/client-s3');
  await s3.client.send(new PutObjectCommand({ Bucket: CACHE, Key: key, Body: forged, Metadata: head.metadata }));
  const forgedRun = await runScript('backup-verda.mts', ['--verify', '--deep'], {
    ...verdaEnv,
    AGE_IDENTITY_FILE: ageKey,
  });
  assert.is(forgedRun.code, 1);
  assert.match(forgedRun.stdout, /differs: r2:\/\/comfy-multi-cache\/verda-config-backup\.tar\.gz\.age/);
});

test('rotation keeps the dated .age bundles of the KEEP_BACKUPS (2) newest points and the image point; AGE_RECIPIENTS may be a file of recipients', async () => {
  const file = path.join(work, 'recipients.txt');
  const second = sh('age-keygen', [])
    .stdout.toString()
    .match(/public key: (age1\S+)/)![1];
  fs.writeFileSync(file, `# Mello's admin\n${ageRecipient}\n\n# the offline key\n${second}\n`);
  for (let i = 0; i < 2; i++) {
    await nextSecond();
    const r = await runScript('backup-verda.mts', ['--quick'], { ...verdaEnv, AGE_RECIPIENTS: file });
    assert.is(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /age-encrypted to 2 recipients/);
  }
  const dated = (await s3.listKeys(CACHE, 'verda-config-backups/')).filter((k) => k.endsWith('.tar.gz.age'));
  // The 2 newest restore points, and the newest whole one that records the worker image (a full
  // run's, kept beside them locally): a kept point's bundle is never deleted.
  const manifests = fs
    .readdirSync(backupDir)
    .filter((n) => /^manifest-\d{8}-\d{6}\.json$/.test(n))
    .sort()
    .reverse();
  const read = (n: string) => JSON.parse(fs.readFileSync(path.join(backupDir, n), 'utf8'));
  const imagePoint = manifests.find((n) => read(n).imageId)!;
  const want = [...new Set([...manifests.slice(0, 2), imagePoint])].map(
    (n) => `verda-config-backups/verda-config-backup-${n.slice(9, 24)}.tar.gz.age`,
  );
  assert.equal(dated.sort(), want.sort(), dated.join(', '));
  assert.ok(dated.includes(`verda-config-backups/verda-config-backup-${newestManifest().timestamp}.tar.gz.age`));
  // Both recipients can decrypt it.
  const stored = await s3.readObject(CACHE, 'verda-config-backup.tar.gz.age');
  assert.is(sh('age', ['-d', '-i', ageKey], { input: stored }).code, 0);
});

test('malformed AGE_RECIPIENTS is exit 2 naming it, before anything is done', async () => {
  const home = tempDir('trust-age');
  const parse = (v: string) => parseAgeRecipients(v, home);
  const load = async (v: string) => loadRecipients(parse(v)!);
  assert.equal(await load(`${ageRecipient}, ${ageRecipient}`), [ageRecipient]);
  assert.is(parse(''), undefined);
  const named = (said: string) => (e: unknown) =>
    e instanceof UsageError && e.message.startsWith('AGE_RECIPIENTS') && e.message.includes(said);
  for (const [value, said] of [
    ['age1qqqq', 'not an age public key'],
    [`${ageRecipient} ssh-ed25519 AAAA`, 'SSH key'],
    [fs.readFileSync(ageKey, 'utf8').match(/AGE-SECRET-KEY-\S+/)![0], 'secret key'],
    ['relative/file', 'absolute path'],
  ]) {
    assert.throws(() => parse(value), named(said), value);
  }
  // A file is read by the script that encrypts (a Verda whose .env names Mello's file still runs).
  const empty = path.join(home, 'empty.txt');
  fs.writeFileSync(empty, '# nobody\n');
  const junk = path.join(home, 'junk.txt');
  fs.writeFileSync(junk, `${ageRecipient}\nage1-not-a-key\n`);
  for (const [file, said] of [
    [path.join(home, 'missing.txt'), 'cannot be read'],
    [empty, 'names no recipient'],
    [junk, `not an age public key in ${junk}`],
  ]) {
    assert.equal(parse(file), { file });
    await load(file).then(
      () => assert.unreachable(file),
      (e) => assert.ok(named(said)(e), (e as Error).message),
    );
  }

  // The checksum is the age library's to check: caught in the plan, still exit 2.
  const badChecksum = ageRecipient.slice(0, -1) + (ageRecipient.endsWith('q') ? 'p' : 'q');
  const before = s3.requests.length;
  for (const value of [badChecksum, junk]) {
    const r = await runScript('backup-verda.mts', ['--quick'], { ...verdaEnv, AGE_RECIPIENTS: value });
    assert.is(r.code, 2, r.stdout + r.stderr);
    assert.match(
      r.stderr,
      /^backup-verda: AGE_RECIPIENTS (holds an invalid age public key|holds something that is not)/,
    );
  }
  assert.is(s3.requests.length, before, 'nothing was sent');
  const r2 = await runScript('backup-verda.mts', ['--quick'], { ...verdaEnv, AGE_RECIPIENTS: 'age1notakey' });
  assert.is(r2.code, 2);
  assert.match(r2.stderr, 'AGE_RECIPIENTS');
  // backup-cron reads no recipients file: a path only Mello has is no error on Verda.
  const cron = await runScript('backup-cron.mts', ['--dry-run'], {
    ...cronEnv,
    AGE_RECIPIENTS: path.join(home, 'missing.txt'),
  });
  assert.is(cron.code, 0, cron.stdout + cron.stderr);
  fs.rmSync(home, { recursive: true });
});

// --- The lock on shared storage -----------------------------------------------------------------

test('a lock from another host with a fresh heartbeat is never taken (exit 75 naming the host); one 10 minutes stale is taken over', async () => {
  const state = path.join(work, 'sfs-state'); // COMFYMULTI_STATE_DIR on storage both instances see
  fs.mkdirSync(state, { recursive: true });
  const lock = path.join(state, 'backup-cron.lock');
  const record = {
    script: 'backup-cron',
    pid: process.pid,
    host: 'verda-yesterday',
    bootId: 'another-boot',
    procStart: '1',
    started: new Date().toISOString(),
  };
  fs.writeFileSync(lock, JSON.stringify(record) + '\n');
  const env = { ...cronEnv, COMFYMULTI_STATE_DIR: state };
  const held = await runScript('backup-cron.mts', ['--dry-run'], env);
  assert.is(held.code, 75, held.stdout + held.stderr);
  assert.match(held.stderr, /holds the lock .* on verda-yesterday/);
  assert.is(fs.readFileSync(lock, 'utf8'), JSON.stringify(record) + '\n', "the other host's lock is untouched");

  // Nine minutes without a heartbeat: still that host's.
  const ago = (min: number) => new Date(Date.now() - min * 60_000);
  fs.utimesSync(lock, ago(9), ago(9));
  assert.is((await runScript('backup-cron.mts', ['--dry-run'], env)).code, 75);

  // Eleven: its holder is gone; the lock is taken over, and released at the end.
  fs.utimesSync(lock, ago(11), ago(11));
  const taken = await runScript('backup-cron.mts', ['--dry-run'], env);
  assert.is(taken.code, 0, taken.stdout + taken.stderr);
  assert.not.ok(fs.existsSync(lock), 'released');
});

test.run();
