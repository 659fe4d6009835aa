// backup-cron.mts as cron runs it: installed with ./install --prefix, started from / with cron's
// bare environment, archiving a fixture Verda to "SFS", then running backup-mello on "Mello" (a
// second install) over a real loopback sshd, whose files must reach a real S3 server.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { shellQuote } from '../lib/ssh.ts';
import {
  runCommand,
  ROOT,
  SECRET,
  sha256,
  startS3,
  tempDir,
  treeDigest,
  writeHeldLock,
  writeTree,
  type S3Server,
} from './helpers.ts';
import { startSshd, type Sshd } from './sshd.ts';

const BUCKET = 'comfy-multi-user-files';
const SCRIPTS = ['backup-cron.mts', 'backup-verda.mts', 'backup-mello.mts', 'restore-verda.mts'];
const KINDS = ['tailscale-identity', 'ssh-host-keys', 'fail2ban', 'ufw', 'project-env'];
const ENV_SECRET = 'TAILSCALE_AUTHKEY=tskey-fixture-secret-77';
// Cron's environment: this and nothing else (`env -i PATH=/usr/bin:/bin HOME=/root`).
const BARE = { PATH: '/usr/bin:/bin', HOME: '/root' };
const ODD = [
  'with space.conf',
  `it's "quoted".conf`,
  '$(touch PWNED).conf',
  '`touch PWNED2`.conf',
  'new\nline.conf',
  'ünï 日本.conf',
  '-dash.conf',
];

let s3: S3Server;
let sshd: Sshd;
let work: string;
let sysroot: string; // the fixture Verda: /etc, /var/lib and /home/dev/comfy-multi under it
let sfs: string;
let verdaRoot: string; // install --prefix on "Verda"
let melloRoot: string; // install --prefix on "Mello"
let melloData: string;
let envFile: string;
let deadConfig: string;
const pkgOf = (root: string) => path.join(root, 'usr/local/lib/comfymulti-scripts');
const cronOf = (root: string) => path.join(root, 'etc/cron.d/comfymulti-backup');
const logOf = (root: string) => path.join(root, 'var/log/comfymulti-backup.log');

const run = (cmd: string, args: string[], env: Record<string, string>, cwd = '/') =>
  runCommand(cmd, args, env, { cwd });

const install = (args: string[], env: Record<string, string> = BARE) =>
  run(path.join(ROOT, 'install'), args, env, os.tmpdir());
/** The installed launcher, from /, under cron's bare environment, configured by the env file. */
const cron = (args: string[] = [], extra: Record<string, string> = {}) =>
  run(path.join(verdaRoot, 'usr/local/bin/backup-cron.mts'), ['--env-file', envFile, ...args], { ...BARE, ...extra });
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
// A new copy is named by the second of its run: make sure the next run has another one.
const nextSecond = () => sleep(1100);

function dotenv(vars: Record<string, string>): string {
  return Object.entries(vars)
    .map(([k, v]) => `${k}="${v.replace(/[\\"$]/g, '\\$&')}"\n`)
    .join('');
}

function put(file: string, content: string | Buffer, mode: number) {
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, content);
  fs.chmodSync(file, mode);
}

/** Every file and directory under root (not following symlinks): type, mode, owner, mtime, content. */
function snapshot(root: string, keep: (rel: string) => boolean = () => true): Record<string, string> {
  const out: Record<string, string> = {};
  const visit = (dir: string, rel: string) => {
    for (const name of fs.readdirSync(dir)) {
      const r = rel ? `${rel}/${name}` : name;
      const full = path.join(dir, name);
      const st = fs.lstatSync(full);
      const meta = `${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid} ${Math.floor(st.mtimeMs / 1000)}`;
      if (st.isDirectory()) {
        if (keep(r)) out[`${r}/`] = meta;
        visit(full, r);
      } else if (keep(r))
        out[r] = `${meta} ${st.isFile() ? sha256(fs.readFileSync(full)) : `-> ${fs.readlinkSync(full)}`}`;
    }
  };
  visit(root, '');
  return out;
}

/** What the five cron archives hold, as paths under the sysroot. */
function backedUp(rel: string): boolean {
  return (
    rel.startsWith('var/lib/tailscale/') ||
    /^etc\/ssh\/ssh_host_[^/]*$/.test(rel) ||
    rel === 'etc/fail2ban/jail.local' ||
    rel.startsWith('etc/fail2ban/jail.d/') ||
    ['etc/ufw/user.rules', 'etc/ufw/user6.rules', 'lib/ufw/user.rules'].includes(rel) ||
    rel === 'home/dev/comfy-multi/.env'
  );
}

/** SFS_BACKUP_DIR: name → identity of the file (a rewrite changes the inode). */
function sfsListing(): Record<string, string> {
  return Object.fromEntries(fs.readdirSync(sfs).map((n) => [n, `${fs.statSync(path.join(sfs, n)).ino}`]));
}

function copies(kind: string): string[] {
  return fs
    .readdirSync(sfs)
    .filter((n) => new RegExp(`^${kind}-\\d{8}-\\d{6}\\.tar\\.gz$`).test(n))
    .sort();
}

/** Extracts archives with the SPEC's restore commands into a fresh root. */
function restore(files: string[]): string {
  const root = tempDir('restore');
  for (const file of files) {
    const kind = KINDS.find((k) => path.basename(file).startsWith(`${k}-`))!;
    const into = { 'tailscale-identity': 'var/lib', 'project-env': 'home/dev/comfy-multi' }[kind as string] ?? '';
    fs.mkdirSync(path.join(root, into), { recursive: true });
    const r = spawnSync('tar', ['-xzf', file, '-C', path.join(root, into) + '/'], { encoding: 'utf8' });
    assert.is(r.status, 0, `tar -xzf ${file}: ${r.stderr}`);
  }
  return root;
}

/** The arguments a launcher's exec line passes, as sh itself parses them. */
/** What a launcher runs: the argv of its exec line, evaluated as sh does, with ARG1 and `two words` given. */
function launcherArgs(launcher: string): string[] {
  const text = fs.readFileSync(launcher, 'utf8');
  assert.match(text, /^exec /m, `an exec line in ${launcher}`);
  const script = text.replace(/^exec /m, "printf '%s\\0' ");
  const r = spawnSync('sh', ['-c', script, 'sh', 'ARG1', 'two words'], { encoding: 'utf8' });
  return r.stdout.split('\0').slice(0, -1);
}

test.before(async () => {
  s3 = await startS3([BUCKET]);
  sshd = await startSshd(['mello']);
  // Names with a space, quotes and $() in every path the scripts and launchers are given.
  work = path.join(tempDir('cron'), `it's a "work" dir $(touch PWNED)`);
  sysroot = path.join(work, 'verda sys');
  sfs = path.join(work, 'sfs/cache/backups');
  verdaRoot = path.join(work, 'verda root');
  melloRoot = path.join(work, `mello root's`);
  melloData = path.join(work, 'mello data');

  const sys = (p: string) => path.join(sysroot, p);
  put(sys('var/lib/tailscale/tailscaled.state'), '{"private-node-key":"privkey:abc"}', 0o600);
  put(sys('var/lib/tailscale/certs/host.crt'), 'CERT', 0o600);
  for (const n of ODD) put(sys(`var/lib/tailscale/odd/${n}`), `tailscale ${n}`, 0o640);
  fs.chmodSync(sys('var/lib/tailscale'), 0o700);
  put(sys('etc/ssh/ssh_host_ed25519_key'), 'PRIVATE HOST KEY', 0o600);
  put(sys('etc/ssh/ssh_host_ed25519_key.pub'), 'ssh-ed25519 AAAA host', 0o644);
  put(sys(`etc/ssh/ssh_host_it's $(touch PWNED) key`), 'ODD HOST KEY', 0o600);
  put(sys('etc/ssh/sshd_config'), 'not a host key', 0o644);
  put(sys('etc/fail2ban/jail.local'), '[sshd]\nenabled = true\n', 0o644);
  for (const n of ODD) put(sys(`etc/fail2ban/jail.d/${n}`), `[${n}]\n`, 0o644);
  put(sys('etc/fail2ban/fail2ban.conf'), 'not backed up', 0o644);
  put(sys('etc/ufw/user.rules'), '*filter\nCOMMIT\n', 0o640);
  put(sys('etc/ufw/user6.rules'), '*filter\nCOMMIT\n', 0o640);
  put(sys('etc/ufw/ufw.conf'), 'not backed up', 0o644);
  put(sys('home/dev/comfy-multi/.env'), `${ENV_SECRET}\n`, 0o600);
  put(sys('home/dev/comfy-multi/docker-compose.yml'), 'not in a cron archive', 0o644);
  // A past mtime, so that keeping it means something.
  const old = new Date('2024-03-01T10:00:00Z');
  for (const rel of Object.keys(snapshot(sysroot))) if (!rel.endsWith('/')) fs.utimesSync(sys(rel), old, old);

  writeTree(melloData, {
    'user_data/user001/workflows/flow.json': '{"nodes":[1,2,3]}',
    'inputs/shared/ref.png': crypto.randomBytes(70_000),
    'outputs/user001/img_0001.png': crypto.randomBytes(100_000),
    ...Object.fromEntries(ODD.map((n) => [`user_data/user003/${n}`, `user file ${n}`])),
  });

  // Port closed: a Mello that cannot be reached.
  const closed = await new Promise<number>((resolve) => {
    const srv = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
  deadConfig = path.join(work, 'dead ssh_config');
  fs.writeFileSync(deadConfig, `Host nohost\n  HostName 127.0.0.1\n  Port ${closed}\n  User root\n`);

  envFile = path.join(work, 'verda cron.env');
  fs.writeFileSync(
    envFile,
    dotenv({
      VERDA_SYSROOT: sysroot,
      VERDA_HOME: sys('home/dev'),
      VERDA_PROJECT_DIR: sys('home/dev/comfy-multi'),
      VERDA_SUDO: '',
      SFS_BACKUP_DIR: sfs,
      MELLO_HOST: 'mello',
      SSH_CONFIG: sshd.config,
      MELLO_SCRIPTS_DIR: pkgOf(melloRoot),
      KEEP_BACKUPS: '2',
      COMFYMULTI_STATE_DIR: path.join(work, 'verda state'),
      // No R2 variable: backup-cron needs none; Mello reads its own configuration.
    }),
    { mode: 0o600 },
  );
});

test.after(async () => {
  await s3.stop();
  await sshd.stop();
  fs.rmSync(path.dirname(work), { recursive: true, force: true });
});

test('install puts the package, four launchers and one cron entry under the prefix, all pointing inside it', async () => {
  const r = await install(['--prefix', verdaRoot]);
  assert.is(r.code, 0, r.stdout + r.stderr);
  const pkg = pkgOf(verdaRoot);
  for (const s of SCRIPTS) {
    const launcher = path.join(verdaRoot, 'usr/local/bin', s);
    assert.is(fs.statSync(launcher).mode & 0o777, 0o755, `${s} is executable`);
    const args = launcherArgs(launcher);
    const [major, minor] = /^v(\d+)\.(\d+)\./
      .exec(spawnSync(args[0], ['--version'], { encoding: 'utf8' }).stdout)!
      .slice(1)
      .map(Number);
    assert.ok(path.isAbsolute(args[0]) && (major > 20 || (major === 20 && minor >= 15)), `node: ${args[0]}`);
    // The bundle built at install: no TypeScript loader, nothing resolved from node_modules.
    assert.equal(args.slice(1), [path.join(pkg, 'dist', s.replace(/\.mts$/, '.mjs')), '--', 'ARG1', 'two words']);
    assert.ok(fs.existsSync(args[1]));
  }
  assert.ok(fs.existsSync(path.join(pkg, 'dist/verda.mjs')), "the Verda bundle, brought to Verda by the models' steps");
  assert.ok(fs.existsSync(path.join(pkg, 'lib/sh/unpack.sh')), 'the shell programs');
  assert.not.ok(fs.existsSync(path.join(pkg, 'node_modules')), 'no node_modules: the bundles hold what they need');
  assert.not.ok(fs.existsSync(path.join(pkg, 'lib/script.ts')), 'no TypeScript');
  assert.not.ok(fs.existsSync(path.join(pkg, '.env')), 'install writes no .env');
  const cronFile = cronOf(verdaRoot);
  assert.is(fs.statSync(cronFile).mode & 0o777, 0o644);
  const entries = fs
    .readFileSync(cronFile, 'utf8')
    .split('\n')
    .filter((l) => l && !l.startsWith('#'));
  const bin = path.join(verdaRoot, 'usr/local/bin/backup-cron.mts');
  assert.equal(entries, [`0 * * * * root ${shellQuote(bin)} >> ${shellQuote(logOf(verdaRoot))} 2>&1`]);

  // Mello: the same package in another root; its .env (beside the real script) configures it.
  const m = await install(['--prefix', melloRoot]);
  assert.is(m.code, 0, m.stdout + m.stderr);
  const melloEnv = {
    MELLO_DATA_DIR: melloData,
    R2_ENDPOINT: s3.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    COMFYMULTI_STATE_DIR: path.join(work, 'mello state'),
  };
  fs.writeFileSync(path.join(pkgOf(melloRoot), '.env'), dotenv(melloEnv), { mode: 0o600 });
});

test('the installed backup-cron runs from / under a bare environment: five archives to SFS, then Mello over SSH', async () => {
  const connections = sshd.connections();
  const r = await cron(['--verbose']);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.is(fs.statSync(sfs).mode & 0o777, 0o700, 'SFS_BACKUP_DIR is private');
  const names = fs.readdirSync(sfs).sort();
  assert.is(names.length, 5, names.join(', '));
  const stamps = new Set(names.map((n) => /-(\d{8}-\d{6})\.tar\.gz$/.exec(n)?.[1]));
  assert.is(stamps.size, 1, 'one T for the run');
  for (const kind of KINDS) {
    assert.is(copies(kind).length, 1, kind);
    assert.is(fs.statSync(path.join(sfs, copies(kind)[0])).mode & 0o777, 0o600, `${kind} is mode 600`);
  }
  // Mello's own step lines came through, and its files reached R2 byte for byte.
  assert.ok(sshd.connections() > connections, 'Mello was reached over SSH');
  assert.match(r.stdout, /mello: Step 1: User data/);
  assert.match(r.stdout, /✓ backup-mello on mello: === Backup complete/);
  const local = treeDigest(melloData);
  assert.is(Object.keys(local).length, 3 + ODD.length);
  for (const [rel, digest] of Object.entries(local)) assert.is(sha256(await s3.readObject(BUCKET, rel)), digest, rel);
  assert.not.ok((r.stdout + r.stderr).includes('tskey-fixture-secret'), 'the .env is never printed');
});

test('the SFS archives restore to their sources with the SPEC restore commands: contents, modes, mtimes', async () => {
  const root = restore(fs.readdirSync(sfs).map((n) => path.join(sfs, n)));
  const expected = snapshot(sysroot, backedUp);
  assert.ok(Object.keys(expected).length > 2 * ODD.length, 'the fixture has what is compared');
  assert.equal(snapshot(root, backedUp), expected);
  // Nothing else: not sshd_config, fail2ban.conf, ufw.conf or the project's other files.
  const files = Object.keys(snapshot(root)).filter((k) => !k.endsWith('/'));
  assert.equal(
    files.filter((f) => !backedUp(f)),
    [],
  );
  fs.rmSync(root, { recursive: true });
});

test('names with spaces, quotes, $(), backquotes and newlines survive and run nothing', async () => {
  for (const n of ODD) assert.is((await s3.readObject(BUCKET, `user_data/user003/${n}`)).toString(), `user file ${n}`);
  for (const dir of [
    work,
    sysroot,
    sfs,
    melloData,
    pkgOf(verdaRoot),
    pkgOf(melloRoot),
    '/',
    '/root',
    os.tmpdir(),
    ROOT,
  ]) {
    assert.not.ok(fs.existsSync(path.join(dir, 'PWNED')), `nothing ran in ${dir}`);
    assert.not.ok(fs.existsSync(path.join(dir, 'PWNED2')), `nothing ran in ${dir}`);
  }
});

test('a second run writes nothing new', async () => {
  const before = sfsListing();
  const r = await cron();
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.equal(sfsListing(), before);
  assert.is(r.stdout.match(/unchanged since .*: not written again/g)?.length, 5);
});

test('a changed source writes one new copy of its kind, and only that', async () => {
  await nextSecond();
  const before = sfsListing();
  fs.writeFileSync(
    path.join(sysroot, 'etc/ufw/user.rules'),
    '*filter\n-A ufw-user-input -p tcp --dport 22 -j ACCEPT\nCOMMIT\n',
  );
  const r = await cron();
  assert.is(r.code, 0, r.stdout + r.stderr);
  const after = sfsListing();
  const added = Object.keys(after).filter((n) => !(n in before));
  assert.is(added.length, 1, added.join(', '));
  assert.match(added[0], /^ufw-\d{8}-\d{6}\.tar\.gz$/);
  for (const n of Object.keys(before)) assert.is(after[n], before[n], `${n} untouched`);
  const root = restore([path.join(sfs, added[0])]);
  assert.is(
    fs.readFileSync(path.join(root, 'etc/ufw/user.rules'), 'utf8'),
    fs.readFileSync(path.join(sysroot, 'etc/ufw/user.rules'), 'utf8'),
  );
  fs.rmSync(root, { recursive: true });
});

test('rotation keeps KEEP_BACKUPS (2) copies of a kind, the newest', async () => {
  await nextSecond();
  const [first, second] = copies('ufw');
  fs.appendFileSync(path.join(sysroot, 'etc/ufw/user.rules'), '# third\n');
  const r = await cron();
  assert.is(r.code, 0, r.stdout + r.stderr);
  const now = copies('ufw');
  assert.is(now.length, 2);
  assert.is(now[0], second);
  assert.not.ok(now.includes(first), 'the oldest went');
  assert.match(r.stdout, /deleted 1 older copies/);
  for (const kind of KINDS.filter((k) => k !== 'ufw')) assert.is(copies(kind).length, 1, kind);
});

test('an unreachable Mello: the SFS copies are written and stand, exit 1 naming Mello', async () => {
  await nextSecond();
  const before = copies('tailscale-identity');
  fs.writeFileSync(path.join(sysroot, 'var/lib/tailscale/tailscaled.state'), '{"private-node-key":"privkey:rotated"}');
  const started = Date.now();
  // The environment wins over the env file.
  const r = await cron([], { MELLO_HOST: 'nohost', SSH_CONFIG: deadConfig });
  assert.is(r.code, 1, r.stdout + r.stderr);
  assert.ok(Date.now() - started < 30_000);
  assert.match(r.stdout, /Mello \(MELLO_HOST=nohost\) cannot be reached/);
  assert.match(r.stdout, /Backup FAILED/);
  const now = copies('tailscale-identity');
  assert.is(now.length, before.length + 1, 'the changed source was copied to SFS all the same');
  const root = restore([path.join(sfs, now[now.length - 1])]);
  assert.match(fs.readFileSync(path.join(root, 'var/lib/tailscale/tailscaled.state'), 'utf8'), 'rotated');
  fs.rmSync(root, { recursive: true });
  assert.equal(
    fs.readdirSync(sfs).filter((n) => n.startsWith('.')),
    [],
    'no temporary file left',
  );
});

test('backup-mello failing on Mello is exit 1 with its exit status and its reason', async () => {
  const melloEnv = path.join(pkgOf(melloRoot), '.env');
  fs.renameSync(melloEnv, `${melloEnv}.away`); // Mello without its configuration
  try {
    const r = await cron();
    assert.is(r.code, 1, r.stdout + r.stderr);
    assert.match(r.stdout, /✗ backup-mello on mello exited 2/);
    assert.match(r.stdout, /✗ mello: backup-mello: MELLO_DATA_DIR does not exist/);
  } finally {
    fs.renameSync(`${melloEnv}.away`, melloEnv);
  }
});

test('MELLO_SCRIPTS_DIR absent on Mello: one line naming the variable, its value and the host', async () => {
  const absent = path.join(work, 'no such scripts dir');
  const r = await cron([], { MELLO_SCRIPTS_DIR: absent });
  assert.is(r.code, 1, r.stdout + r.stderr);
  const failed = r.stdout.split('\n').filter((l) => /^\s+✗/.test(l));
  assert.equal(
    failed.map((l) => l.trim()),
    [
      `✗ MELLO_SCRIPTS_DIR (${absent}) does not exist on mello`,
      `✗ Step 7 (Trigger backup-mello on Mello): MELLO_SCRIPTS_DIR (${absent}) does not exist on mello`,
    ],
    r.stdout,
  );
});

test('--dry-run says what would be written and triggered, and changes nothing', async () => {
  fs.appendFileSync(path.join(sysroot, 'etc/fail2ban/jail.local'), 'bantime = 1h\n');
  const before = sfsListing();
  const connections = sshd.connections();
  const requests = s3.requests.length;
  const r = await cron(['--dry-run']);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /would write fail2ban-\d{8}-\d{6}\.tar\.gz/);
  assert.match(r.stdout, `would run backup-mello.mts --full in ${pkgOf(melloRoot)} on Mello (MELLO_HOST=mello)`);
  assert.equal(sfsListing(), before);
  assert.is(sshd.connections(), connections, 'no SSH connection');
  assert.is(s3.requests.length, requests);
});

test('--json gives the summary on stdout; --quick runs Mello with --quick', async () => {
  await nextSecond();
  const r = await cron(['--json', '--quick']);
  assert.is(r.code, 0, r.stdout + r.stderr);
  const summary = JSON.parse(r.stdout);
  assert.is(summary.script, 'backup-cron');
  assert.is(summary.exitCode, 0);
  assert.equal(
    summary.steps.map((s: { status: string }) => s.status),
    ['ok', 'ok', 'ok', 'ok', 'ok', 'ok', 'ok'],
  );
  KINDS.forEach((k, i) => assert.match(summary.steps[i].moves, `${k}-`, `step ${i + 1} is ${k}`));
  assert.equal(
    summary.steps.slice(5).map((s: { name: string }) => s.name),
    ['Rotation', 'Trigger backup-mello on Mello'],
  );
  assert.is(summary.steps[2].data.file, path.join(sfs, copies('fail2ban').pop()!), 'the changed fail2ban was written');
  assert.match(summary.steps[6].moves, /backup-mello\.mts --quick/);
  assert.match(r.stderr, /Step 1: /);
});

test("--verify checks the newest SFS copy of each kind and runs Mello's --verify; a damaged copy is exit 1 naming it and replaced by the next run", async () => {
  const ok = await cron(['--verify']);
  assert.is(ok.code, 0, ok.stdout + ok.stderr);
  assert.is(ok.stdout.match(/: whole, \d+ entries/g)?.length, 5);
  assert.match(ok.stdout, /✓ backup-mello on mello: === Verify complete/, 'Mello checked its R2 objects');

  const newest = path.join(sfs, copies('ssh-host-keys').pop()!);
  const bytes = fs.readFileSync(newest);
  fs.writeFileSync(newest, bytes.subarray(0, bytes.length >> 1));
  const bad = await cron(['--verify']);
  assert.is(bad.code, 1, bad.stdout + bad.stderr);
  assert.match(bad.stdout, `${path.basename(newest)} is not a whole archive`);
  assert.match(bad.stdout, /Verify FAILED/);

  await nextSecond();
  const r = await cron();
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.is(copies('ssh-host-keys').length, 2, 'a fresh copy beside the damaged one');
  assert.is((await cron(['--verify'])).code, 0);
});

test('a missing optional source is a warning and a skipped row, not a failure', async () => {
  fs.rmSync(path.join(sysroot, 'etc/fail2ban'), { recursive: true });
  const r = await cron(['--json']);
  assert.is(r.code, 0, r.stdout + r.stderr);
  const step = JSON.parse(r.stdout).steps[2];
  assert.match(step.moves, '/fail2ban-');
  assert.is(step.status, 'skipped');
  assert.match(step.warnings.join(), 'jail.local');
  assert.match(r.stderr, /⚠ .*jail\.local/);
});

test('a run while another holds the lock exits 75 at once and writes nothing', async () => {
  const lock = path.join(work, 'verda state', 'backup-cron.lock');
  writeHeldLock(lock, 'backup-cron'); // a live holder: this test process, as its record says
  const before = sfsListing();
  fs.appendFileSync(path.join(sysroot, 'etc/ufw/user6.rules'), '# changed\n');
  const r = await cron();
  assert.is(r.code, 75, r.stdout + r.stderr);
  assert.match(r.stderr, 'lock');
  assert.equal(sfsListing(), before);
  fs.rmSync(lock);
});

test("the cron line itself, run by sh from / in cron's environment, reads the installed .env and appends to the log", async () => {
  await nextSecond();
  fs.copyFileSync(envFile, path.join(pkgOf(verdaRoot), '.env'));
  fs.chmodSync(path.join(pkgOf(verdaRoot), '.env'), 0o600);
  const line = fs
    .readFileSync(cronOf(verdaRoot), 'utf8')
    .split('\n')
    .find((l) => l.startsWith('0 * * * * root '))!;
  const command = line.slice('0 * * * * root '.length);
  for (let i = 1; i <= 2; i++) {
    const r = await run('/bin/sh', ['-c', command], BARE);
    assert.is(r.code, 0, fs.existsSync(logOf(verdaRoot)) ? fs.readFileSync(logOf(verdaRoot), 'utf8') : r.stderr);
    assert.is(r.stdout + r.stderr, '', 'all output goes to the log');
    const log = fs.readFileSync(logOf(verdaRoot), 'utf8');
    assert.is(log.match(/^=== Backup complete/gm)?.length, i, 'appended, not replaced');
  }
  assert.is(copies('ufw').length, 2);
  assert.ok(fs.readFileSync(path.join(sfs, copies('ufw').pop()!)).length > 0);
});

test('a second install leaves one cron entry, the same files, and the .env as it was', async () => {
  const before = snapshot(verdaRoot, (rel) => !rel.startsWith('var/log'));
  const r = await install(['--prefix', verdaRoot]);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /kept as it was/);
  const after = snapshot(verdaRoot, (rel) => !rel.startsWith('var/log'));
  // Rewritten files and directories get a new mtime: names, types, modes and contents count.
  const strip = (s: Record<string, string>) =>
    Object.fromEntries(
      Object.entries(s).map(([k, v]) => [
        k,
        v
          .split(' ')
          .filter((_, i) => i !== 2)
          .join(' '),
      ]),
    );
  const [a, b] = [strip(after), strip(before)];
  const differ = [...new Set([...Object.keys(a), ...Object.keys(b)])].filter((k) => a[k] !== b[k]);
  assert.equal(
    differ.map((k) => `${k}: ${b[k]} → ${a[k]}`),
    [],
  );
  assert.ok(
    Object.keys(a).some((k) => k.endsWith('comfymulti-scripts/dist/verda.mjs')),
    'the package (its bundles) was compared',
  );
  assert.is(fs.readFileSync(cronOf(verdaRoot), 'utf8').match(/backup-cron\.mts/g)?.length, 1);
  assert.is(fs.readFileSync(path.join(pkgOf(verdaRoot), '.env'), 'utf8'), fs.readFileSync(envFile, 'utf8'));
});

test('--uninstall removes what install installed, and only that', async () => {
  const bin = path.join(verdaRoot, 'usr/local/bin');
  fs.writeFileSync(path.join(bin, 'other-tool'), '#!/bin/sh\n', { mode: 0o755 });
  fs.writeFileSync(path.join(verdaRoot, 'etc/cron.d/other'), '0 3 * * * root true\n');
  const r = await install(['--prefix', verdaRoot, '--uninstall']);
  assert.is(r.code, 0, r.stdout + r.stderr);
  for (const s of SCRIPTS) assert.not.ok(fs.existsSync(path.join(bin, s)), s);
  assert.not.ok(fs.existsSync(cronOf(verdaRoot)));
  assert.equal(fs.readdirSync(pkgOf(verdaRoot)), ['.env'], "the admin's .env is left");
  assert.ok(fs.existsSync(path.join(bin, 'other-tool')));
  assert.ok(fs.existsSync(path.join(verdaRoot, 'etc/cron.d/other')));
  assert.ok(fs.existsSync(logOf(verdaRoot)), 'the log is left');
  const again = await install(['--prefix', verdaRoot, '--uninstall']);
  assert.is(again.code, 0, again.stderr);
  assert.ok(fs.existsSync(path.join(bin, 'other-tool')));
});

test('no Node.js, or not a Node.js, is exit 2 with a clear message, and nothing is installed', async () => {
  const target = path.join(work, 'no node root');
  // PATH without node: the check uses shell builtins only, so it can run with nothing on PATH.
  const none = await run(
    '/bin/sh',
    [path.join(ROOT, 'install'), '--prefix', target],
    { PATH: '/nonexistent', HOME: '/root' },
    os.tmpdir(),
  );
  assert.is(none.code, 2, none.stdout + none.stderr);
  assert.match(none.stderr, /Node\.js not found/);
  const echo = await install(['--prefix', target, '--node', '/bin/echo']);
  assert.is(echo.code, 2, echo.stdout + echo.stderr);
  assert.match(echo.stderr, /not a Node\.js version/);
  assert.not.ok(fs.existsSync(target));
  const bad = await install(['--prefix', target, '--bogus']);
  assert.is(bad.code, 2);
  assert.match(bad.stderr, '--bogus');
});

test.run();
