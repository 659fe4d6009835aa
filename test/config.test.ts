// Configuration as data: the .env reader, and every variable checked before anything is done.
// Unit tests call parseDotenv and loadConfig in-process; the end-to-end runs at the bottom show
// the findings of issue 10 (6, 7, 10, 15, 18b, 18d) as an admin would meet them.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { UsageError, errorText } from '../lib/cli.ts';
import {
  bucketTarget,
  checkBucketName,
  checkEndpoint,
  checkImageReference,
  loadConfig,
  parseDotenv,
  requireDir,
  requireDirOrAbsent,
  sshDestination,
  type Config,
} from '../lib/config.ts';
import { writeFileAtomic } from '../lib/files.ts';
import { ROOT, SECRET, out, runScript, startS3, tempDir, type RunResult, type S3Server } from './helpers.ts';
import { makeVerda, type VerdaFixture } from './verda-fixture.ts';

const CACHE = 'comfy-multi-cache';
const MODELS = 'comfy-multi-model-vault-backup';
const USER_FILES = 'comfy-multi-user-files';
/** A run that has not ended by then hangs: it is killed and the test fails. */
const RUN_LIMIT_MS = 20_000;
const STACK = /\n\s+at .+:\d+/;

let work: string;
/** A directory with no .env: loadConfig's scriptDir in the unit tests. */
let noEnvDir: string;
let s3: S3Server;
let verda: VerdaFixture;

test.before(async () => {
  work = tempDir('config');
  noEnvDir = path.join(work, 'no-env');
  fs.mkdirSync(noEnvDir);
  s3 = await startS3([CACHE, MODELS, USER_FILES]);
  verda = makeVerda(path.join(work, 'verda'));
});

test.after(async () => {
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

/** `fn` throws a UsageError whose message matches every one of `names` (variable names, file:line). */
function refuses(fn: () => unknown, ...names: (string | RegExp)[]): string {
  try {
    fn();
  } catch (e) {
    assert.instance(e, UsageError, `a UsageError, not ${String(e)}`);
    const message = (e as Error).message;
    for (const n of names) assert.match(message, n);
    return message;
  }
  assert.unreachable(`accepted, expected a refusal naming ${names.join(', ')}`);
  return '';
}

const load = (env: Record<string, string>, envFile?: string) =>
  loadConfig({ HOME: '/home/admin', ...env }, noEnvDir, envFile);

function envFile(name: string, text: string): string {
  const file = path.join(work, name);
  fs.writeFileSync(file, text);
  return file;
}

// -------------------------------------------------------------------------------------------
// .env parsing (finding 6)

test('.env: quotes and comments are taken off as the shell would', () => {
  const cases: [string, string][] = [
    ['K="/srv/b"  # note', '/srv/b'],
    ["K='x' # c", 'x'],
    ["K='a\\\"b $HOME \\n'", 'a\\"b $HOME \\n'], // single quotes are literal
    ['K="a\\"b\\\\c\\$d\\ne\\`f"', 'a"b\\c$d\ne`f'],
    ['K="a\\tb"', 'a\\tb'], // as in the shell: other backslashes stay
    ['K="it\'s"', "it's"],
    ['K=value # comment', 'value'],
    ['K=a#b', 'a#b'],
    ['K=#a', '#a'],
    ['K= # only a comment', ''],
    ['K=', ''],
    ['K=""', ''],
    ['K="a # not a comment"', 'a # not a comment'],
    ['K="a" # c "d"', 'a'],
    ['export K=v', 'v'],
    ['  export   K = v  ', 'v'],
    ['K=two words', 'two words'],
  ];
  for (const [line, value] of cases) assert.equal(parseDotenv(line, 'f'), { K: value }, line);
});

test('.env: CRLF line ends, a BOM, blank and comment lines, later lines win', () => {
  const text = '\uFEFF# head\r\nA="1"  # one\r\n\r\n   # indented comment\r\nB=2\r\nA=3\r\nC=\'x\'\r\n';
  assert.equal(parseDotenv(text, 'f'), { A: '3', B: '2', C: 'x' });
});

test('.env: a quoted secret keeps no quotes', () => {
  const quoted = parseDotenv('R2_SECRET_ACCESS_KEY="s3cr3t"  # from the dashboard\n', 'f');
  assert.equal(quoted, { R2_SECRET_ACCESS_KEY: 's3cr3t' });
  assert.equal(parseDotenv("R2_SECRET_ACCESS_KEY='s3cr3t'\n", 'f'), { R2_SECRET_ACCESS_KEY: 's3cr3t' });
});

test('.env: an unterminated quote, text after a closing quote, a line that is no assignment: file:line', () => {
  const cases: [string, RegExp][] = [
    ['A=1\nK="abc\n', /^f\.env:2: K: the double quote is not closed/],
    ["A=1\n\nK='abc\n", /^f\.env:3: K: the single quote is not closed/],
    ['K="a\\"\n', /^f\.env:1: K: the double quote is not closed/],
    ['K="a"b\n', /^f\.env:1: K: text after the closing double quote/],
    ['K="a"#b\n', /^f\.env:1: K: text after the closing double quote/],
    ["K='a' 'b'\n", /^f\.env:1: K: text after the closing single quote/],
    ['A=1\r\nnot an assignment\r\n', /^f\.env:2: not a KEY=VALUE line/],
    ['export K\n', /^f\.env:1: not a KEY=VALUE line/],
    ['1K=v\n', /^f\.env:1: not a KEY=VALUE line/],
  ];
  for (const [text, message] of cases) refuses(() => parseDotenv(text, 'f.env'), message);
});

test('.env: a refused line never shows its value', () => {
  const message = refuses(() => parseDotenv('R2_SECRET_ACCESS_KEY="s3cr3t-value\n', 'f'), 'R2_SECRET_ACCESS_KEY');
  assert.not.ok(message.includes('s3cr3t'));
});

test('.env through loadConfig: values reach the configuration unquoted; the environment wins', () => {
  const text = 'BACKUP_DIR="/srv/b"  # note\nKEEP_BACKUPS=\'3\' # three\nVERDA_HOST=dev@gpu # x\n';
  const file = envFile('quoted.env', text);
  const cfg = load({ VERDA_HOST: 'local' }, file);
  assert.is(cfg.backupDir, '/srv/b');
  assert.is(cfg.keepBackups, 3);
  assert.is(cfg.verdaHost, 'local');
});

// -------------------------------------------------------------------------------------------
// The env file itself (must be a regular file, never blocking)

test('--env-file: a directory or a device is exit 2 naming it; a symlink to a regular file is read', () => {
  refuses(() => load({}, work), `--env-file ${work}`, /EISDIR/);
  refuses(() => load({}, '/dev/null'), '--env-file /dev/null', /character device, not a regular file/);
  refuses(() => load({}, path.join(work, 'missing.env')), 'missing.env', /ENOENT/);
  const target = envFile('target.env', 'BACKUP_DIR=/srv/linked\n');
  const link = path.join(work, 'link.env');
  fs.symlinkSync(target, link);
  assert.is(load({}, link).backupDir, '/srv/linked');
});

test('the default .env beside the scripts: absent is fine; a directory is refused naming it', () => {
  assert.is(load({}).backupDir, '/home/admin/backups/verda');
  const dir = path.join(work, 'env-is-dir');
  fs.mkdirSync(path.join(dir, '.env'), { recursive: true });
  refuses(() => loadConfig({ HOME: '/home/admin' }, dir), path.join(dir, '.env'), /EISDIR/);
});

test('the default .env as a FIFO is refused at once (in a child, so a hang cannot hold this file)', () => {
  const dir = path.join(work, 'env-is-fifo');
  fs.mkdirSync(dir);
  const fifo = path.join(dir, '.env');
  assert.is(spawnSync('mkfifo', [fifo]).status, 0, 'mkfifo');
  const code = `
    import { loadConfig } from ${JSON.stringify(path.join(ROOT, 'lib/config.ts'))};
    try { loadConfig({ HOME: '/home/admin' }, ${JSON.stringify(dir)}); console.log('accepted'); }
    catch (e) { console.log(e.constructor.name + ': ' + e.message); }`;
  const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code], {
    cwd: ROOT,
    encoding: 'utf8',
    timeout: RUN_LIMIT_MS,
  });
  assert.is(r.signal, null, 'ended by itself');
  assert.match(r.stdout, `UsageError: ${fifo}: cannot be read (a FIFO, not a regular file)`);
});

// -------------------------------------------------------------------------------------------
// Paths (finding 6): absolute after ~ expansion, no NUL or line break

const PATH_VARIABLES = [
  'BACKUP_DIR',
  'MELLO_DATA_DIR',
  'MELLO_SCRIPTS_DIR',
  'VERDA_SYSROOT',
  'VERDA_HOME',
  'VERDA_PROJECT_DIR',
  'VERDA_MODELS_DIR',
  'SFS_BACKUP_DIR',
  'COMFYMULTI_STATE_DIR',
  'SSH_CONFIG',
];

test('every path variable must be absolute: a relative one is refused naming it', () => {
  for (const name of PATH_VARIABLES) {
    for (const value of ['backups', './backups', '"/srv/b"', '~admin/b']) {
      refuses(() => load({ [name]: value }), new RegExp(`^${name} must be an absolute path`));
    }
    for (const value of ['/srv/a\nb', '/srv/a\0b', '/srv/a\rb']) {
      refuses(() => load({ [name]: value }), `${name} holds a NUL`);
    }
  }
});

test('~ and ~/ are expanded against HOME; a relative HOME makes a ~ path refused, saying so', () => {
  const cfg = load({ BACKUP_DIR: '~/b', MELLO_DATA_DIR: '~', SSH_CONFIG: '~/.ssh/config' });
  assert.is(cfg.backupDir, '/home/admin/b');
  assert.is(cfg.melloDataDir, '/home/admin');
  assert.is(cfg.sshConfig, '/home/admin/.ssh/config');
  refuses(() => load({ HOME: 'relative/home' }), /^BACKUP_DIR must be an absolute path .*HOME is "relative\/home"/);
});

test('a relative XDG_CACHE_HOME is ignored (XDG says so): the state dir stays under HOME', () => {
  assert.is(load({ XDG_CACHE_HOME: 'cache' }).stateDir, '/home/admin/.cache/comfymulti-scripts');
  assert.is(load({ XDG_CACHE_HOME: '/var/cache/admin' }).stateDir, '/var/cache/admin/comfymulti-scripts');
});

// -------------------------------------------------------------------------------------------
// CONTAINER_IMAGE (finding 7)

test('CONTAINER_IMAGE: image references and IDs pass; an option, spaces, uppercase repository are refused', () => {
  const hex = 'a'.repeat(64);
  for (const ok of [
    'comfy-multi-worker-1',
    'comfy_multi.worker__x--y',
    'worker:v2',
    'localhost/worker',
    'registry.example:5000/team/worker:v2.1-rc_1',
    'Registry.Example/team/worker',
    '[::1]:5000/worker',
    `worker@sha256:${hex}`,
    `ghcr.io/team/worker:v2@sha256:${hex}`,
    hex,
    `sha256:${hex}`,
    '0123456789ab',
  ]) {
    assert.is(checkImageReference('CONTAINER_IMAGE', ok), ok);
    assert.is(load({ CONTAINER_IMAGE: ok }).containerImage, ok);
  }
  for (const bad of [
    '--help',
    '-q',
    'worker --help',
    ' worker',
    'worker\n',
    'Worker',
    'ghcr.io/Team/worker',
    'worker:-v',
    'worker:',
    'worker@sha256:abc',
    'worker@md5:' + hex,
    'a___b',
    'a-',
    '_a',
    'a//b',
    '/a',
    'a/',
    `w:${'t'.repeat(129)}`,
    `${'a'.repeat(256)}`,
  ]) {
    refuses(() => load({ CONTAINER_IMAGE: bad }), /^CONTAINER_IMAGE is not an image reference/);
  }
});

// -------------------------------------------------------------------------------------------
// VERDA_HOST / MELLO_HOST (finding 10)

test('hosts: local, [user@]host, IPv4, IPv6 and ssh:// URIs pass as ssh takes them', () => {
  const cases: [string, string][] = [
    ['local', 'local'],
    ['verda', 'verda'],
    ['dev@verda', 'dev@verda'],
    ['dev@gpu-1.example.com', 'dev@gpu-1.example.com'],
    ['my_alias', 'my_alias'],
    ['root@10.0.0.7', 'root@10.0.0.7'],
    ['dev@::1', 'dev@::1'],
    ['dev@[::1]', 'dev@::1'], // OpenSSH keeps the brackets of a plain destination and cannot resolve them
    ['[fe80::1%eth0]', 'fe80::1%eth0'],
    ['ssh://dev@verda:2222', 'ssh://dev@verda:2222'],
    ['ssh://verda', 'ssh://verda'],
    ['ssh://d.e-v@10.0.0.7:22', 'ssh://d.e-v@10.0.0.7:22'],
  ];
  for (const [value, destination] of cases) {
    assert.is(sshDestination('VERDA_HOST', value), destination, value);
    assert.is(load({ VERDA_HOST: value }).verdaHost, destination);
    assert.is(load({ MELLO_HOST: value }).melloHost, destination);
  }
});

test('hosts: an option, whitespace, control characters, empty or malformed parts are refused, naming it', () => {
  for (const bad of [
    '-oProxyCommand=x',
    '-V',
    'dev@-oProxyCommand=x',
    '-dev@verda',
    'dev@verda -p 22',
    ' verda',
    'verda\n',
    'ver\tda',
    'ver\x01da',
    '@verda',
    'dev@',
    'dev@verda@x',
    'verda:22',
    'verda/x',
    '..',
    'a..b',
    '.verda',
    'verda-',
    '1.2.3.256',
    '1.2.3',
    '[verda]',
    '[::1',
    'ssh://',
    'ssh://dev@',
    'ssh://@verda',
    'ssh://verda:0',
    'ssh://verda:65536',
    'ssh://verda:x',
    'ssh://verda/path',
    'ssh://dev@[::1]:22',
    'ssh://-oProxyCommand=x',
    'LOCAL ',
  ]) {
    refuses(() => load({ VERDA_HOST: bad }), /^VERDA_HOST /);
    refuses(() => load({ MELLO_HOST: bad }), /^MELLO_HOST /);
  }
});

// -------------------------------------------------------------------------------------------
// Endpoints (finding 15) and bucket names (finding 18d)

test('endpoints: http(s)://host[:port] passes; a path says the bucket belongs in the bucket variable', () => {
  const r2 = 'https://acc.r2.cloudflarestorage.com';
  for (const [value, origin] of [
    [r2, r2],
    [`${r2}/`, r2],
    ['http://127.0.0.1:9000', 'http://127.0.0.1:9000'],
    ['http://[::1]:9000', 'http://[::1]:9000'],
  ]) {
    assert.is(checkEndpoint('R2_ENDPOINT', value), origin);
  }
  const withBucket = { R2_ENDPOINT: `${r2}/comfy-multi-cache` };
  refuses(() => load(withBucket), /^R2_ENDPOINT .*without a path/, /"comfy-multi-cache"/, 'R2_CACHE_BUCKET');
  const perBucket = { R2_USER_FILES_ENDPOINT: `${r2}/b` };
  refuses(() => load(perBucket), /^R2_USER_FILES_ENDPOINT .*path.*belongs in R2_USER_FILES_BUCKET/);
  refuses(() => load({ R2_MODELS_ENDPOINT: `${r2}/b/c` }), /^R2_MODELS_ENDPOINT/, 'R2_MODELS_BUCKET');
  refuses(() => load({ R2_CACHE_ENDPOINT: `${r2}?x=1` }), /^R2_CACHE_ENDPOINT .*query or fragment/);
  refuses(() => load({ R2_ENDPOINT: `${r2}?` }), /^R2_ENDPOINT .*query or fragment/);
  refuses(() => load({ R2_ENDPOINT: `${r2}#frag` }), /^R2_ENDPOINT .*query or fragment/);
  refuses(() => load({ R2_ENDPOINT: ` ${r2}` }), /^R2_ENDPOINT holds whitespace/);
  refuses(() => load({ R2_ENDPOINT: 'ftp://r2.example' }), /^R2_ENDPOINT must be an http\(s\) URL/);
  refuses(() => load({ R2_ENDPOINT: 'r2.example.com' }), /^R2_ENDPOINT is not a URL/);
  const userInfo = { R2_ENDPOINT: 'https://key:hunter2@acc.r2.example' };
  const withPassword = refuses(() => load(userInfo), /^R2_ENDPOINT must not hold a user name/);
  assert.not.ok(withPassword.includes('hunter2'), 'the password is not printed');
  refuses(() => load({ R2_ENDPOINT: 'https://@acc.r2.example' }), /^R2_ENDPOINT must not hold a user name/);
});

test('bucketTarget checks the endpoint it uses the same way, and returns the origin', async () => {
  const { bucketTarget } = await import('../lib/config.ts');
  const cfg = load({ R2_ENDPOINT: 'https://acc.r2.example/', R2_ACCESS_KEY_ID: 'k', R2_SECRET_ACCESS_KEY: 's' });
  assert.is(bucketTarget(cfg, 'cache').endpoint, 'https://acc.r2.example');
  // A configuration built by hand (not through loadConfig) still cannot send a path.
  const handMade: Config = { ...cfg, env: { ...cfg.env, R2_ENDPOINT: 'https://acc.r2.example/b' } };
  refuses(() => bucketTarget(handMade, 'models'), /^R2_ENDPOINT/, 'R2_MODELS_BUCKET');
});

test('bucket names: S3 rules, each refusal naming the variable', () => {
  for (const ok of ['abc', 'comfy-multi-cache', 'a.b-c.d', '0-9', 'a'.repeat(63), '1.2.3.a']) {
    assert.is(checkBucketName('R2_CACHE_BUCKET', ok), ok);
  }
  const cases: [string, RegExp][] = [
    ['a..b', /must not hold "\.\."/],
    ['ab', /3 to 63/],
    ['a'.repeat(64), /3 to 63/],
    ['Abc', /lowercase/],
    ['a_b', /lowercase/],
    ['a b', /lowercase/],
    ['-ab', /start and end/],
    ['ab-', /start and end/],
    ['.ab', /start and end/],
    ['a.-b', /"\.-"/],
    ['a-.b', /"-\."/],
    ['192.168.5.4', /IP address/],
    ['xn--abc', /xn--/],
    ['data-s3alias', /-s3alias/],
  ];
  for (const name of ['R2_MODELS_BUCKET', 'R2_CACHE_BUCKET', 'R2_USER_FILES_BUCKET']) {
    const refusal = new RegExp(`^${name} is not a valid bucket name`);
    for (const [bucket, why] of cases) refuses(() => load({ [name]: bucket }), refusal, why);
  }
});

// -------------------------------------------------------------------------------------------
// The other values

test('VERDA_SUDO may be empty or a command, never an option; KEEP_BACKUPS and CONTAINER_CLI stay checked', () => {
  assert.equal(load({}).verdaSudo, ['sudo', '-n']);
  assert.equal(load({ VERDA_SUDO: '' }).verdaSudo, []);
  assert.equal(load({ VERDA_SUDO: 'doas' }).verdaSudo, ['doas']);
  for (const bad of ['-n', ' -n', '-u root sudo', 'sudo\n-n']) refuses(() => load({ VERDA_SUDO: bad }), /^VERDA_SUDO /);
  for (const bad of ['0', '-1', '1.5', 'ten']) refuses(() => load({ KEEP_BACKUPS: bad }), /^KEEP_BACKUPS /);
  refuses(() => load({ CONTAINER_CLI: '--help' }), /^CONTAINER_CLI /);
});

// -------------------------------------------------------------------------------------------
// Directories on this machine (finding 18b)

test('requireDirOrAbsent: absent or a directory passes; a file, a file above it, a dangling symlink do not', () => {
  const root = path.join(work, 'dirs');
  fs.mkdirSync(path.join(root, 'dir'), { recursive: true });
  fs.writeFileSync(path.join(root, 'file'), 'x');
  fs.symlinkSync(path.join(root, 'dir'), path.join(root, 'link-to-dir'));
  fs.symlinkSync(path.join(root, 'nothing'), path.join(root, 'dangling'));
  const with_ = (name: 'BACKUP_DIR' | 'SFS_BACKUP_DIR' | 'COMFYMULTI_STATE_DIR', rel: string) =>
    load({ [name]: path.join(root, rel) });
  for (const rel of ['dir', 'absent', 'absent/deeper', 'link-to-dir', 'link-to-dir/new', 'dir/new']) {
    requireDirOrAbsent(with_('BACKUP_DIR', rel), 'BACKUP_DIR');
  }
  const file = path.join(root, 'file');
  refuses(
    () => requireDirOrAbsent(with_('BACKUP_DIR', 'file'), 'BACKUP_DIR'),
    `BACKUP_DIR is not a directory: ${file} is a regular file`,
  );
  refuses(
    () => requireDirOrAbsent(with_('SFS_BACKUP_DIR', 'file/sub/dir'), 'SFS_BACKUP_DIR'),
    `SFS_BACKUP_DIR: ${file}/sub/dir cannot be created: ${file} is a regular file`,
  );
  refuses(
    () => requireDirOrAbsent(with_('COMFYMULTI_STATE_DIR', 'dangling'), 'COMFYMULTI_STATE_DIR'),
    /^COMFYMULTI_STATE_DIR: .*dangling is a symlink to nothing/,
  );
  refuses(
    () => requireDirOrAbsent(load({ BACKUP_DIR: '/dev/null' }), 'BACKUP_DIR'),
    'BACKUP_DIR is not a directory: /dev/null is a character device',
  );
});

test('requireDir: MELLO_DATA_DIR must be there and be a directory', () => {
  const root = path.join(work, 'data-dirs');
  fs.mkdirSync(path.join(root, 'data'), { recursive: true });
  fs.writeFileSync(path.join(root, 'file'), 'x');
  requireDir(load({ MELLO_DATA_DIR: path.join(root, 'data') }), 'MELLO_DATA_DIR');
  const at = (rel: string) => load({ MELLO_DATA_DIR: path.join(root, rel) });
  refuses(() => requireDir(at('absent'), 'MELLO_DATA_DIR'), /^MELLO_DATA_DIR does not exist/);
  refuses(() => requireDir(at('file'), 'MELLO_DATA_DIR'), /^MELLO_DATA_DIR is not a directory/);
});

// -------------------------------------------------------------------------------------------
// Errors that say what to do (issue 20)

test('a default that fails for lack of a .env says "no .env at PATH"; with a .env (or --env-file) it does not', () => {
  const noEnv = path.join(noEnvDir, '.env');
  const hint = `no .env at ${noEnv}`;
  const bare = loadConfig({ HOME: path.join(work, 'fresh-home') }, noEnvDir);
  const data = refuses(() => requireDir(bare, 'MELLO_DATA_DIR'), /^MELLO_DATA_DIR does not exist: /);
  assert.match(data, `${path.join(work, 'fresh-home')}/projects/comfyui/data (the default; ${hint})`);
  refuses(() => bucketTarget(bare, 'userFiles'), `R2_ENDPOINT is not set (${hint}; needed for the userFiles bucket`);
  const keyless = loadConfig({ HOME: '/h', R2_ENDPOINT: 'https://acc.r2.example' }, noEnvDir);
  refuses(() => bucketTarget(keyless, 'cache'), `R2_ACCESS_KEY_ID is not set (${hint}; nor AWS_ACCESS_KEY_ID`);
  // Set, not defaulted: the .env is not what is wrong.
  const set = loadConfig({ HOME: '/h', MELLO_DATA_DIR: path.join(work, 'absent') }, noEnvDir);
  const named = refuses(() => requireDir(set, 'MELLO_DATA_DIR'), /^MELLO_DATA_DIR does not exist/);
  assert.not.match(named, 'no .env');
  // A .env that is there, and an --env-file: no hint either.
  const withEnv = path.join(work, 'with-env');
  fs.mkdirSync(withEnv, { recursive: true });
  fs.writeFileSync(path.join(withEnv, '.env'), 'KEEP_BACKUPS=3\n');
  const read = loadConfig({ HOME: path.join(work, 'fresh-home') }, withEnv);
  assert.not.match(
    refuses(() => requireDir(read, 'MELLO_DATA_DIR'), /does not exist/),
    'no .env',
  );
  const file = envFile('hint.env', 'KEEP_BACKUPS=3\n');
  const given = loadConfig({ HOME: path.join(work, 'fresh-home') }, noEnvDir, file);
  assert.not.match(
    refuses(() => bucketTarget(given, 'models'), /^R2_ENDPOINT is not set/),
    'no .env',
  );
});

test('errorText names the variable of the directory an EACCES or ENOSPC happened in, the deepest one', () => {
  const disk = path.join(work, 'tiny-disk');
  fs.mkdirSync(disk);
  assert.is(spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=16k', 'tmpfs', disk]).status, 0, 'mount a 16 KiB tmpfs');
  try {
    const state = path.join(disk, 'state');
    fs.mkdirSync(state);
    load({ BACKUP_DIR: disk, COMFYMULTI_STATE_DIR: state });
    const full = (file: string) => {
      try {
        writeFileAtomic(file, Buffer.alloc(64 * 1024));
      } catch (e) {
        return errorText(e);
      }
      return assert.unreachable('64 KiB written on a 16 KiB disk') as never;
    };
    assert.is(
      full(path.join(disk, 'a.tar.gz')),
      `ENOSPC: ${disk}/a.tar.gz (BACKUP_DIR: its disk is full; free space there or set BACKUP_DIR to a directory on a larger disk)`,
    );
    assert.match(full(path.join(state, 'hashes.jsonl')), `ENOSPC: ${state}/hashes.jsonl (COMFYMULTI_STATE_DIR: `);
    // Elsewhere, and an errno with nothing to advise: as before.
    const other = errorText(Object.assign(new Error('x'), { code: 'ENOSPC', path: '/elsewhere/f' }));
    assert.is(other, 'ENOSPC: /elsewhere/f');
    const missing = errorText(Object.assign(new Error('x'), { code: 'ENOENT', path: `${disk}/f` }));
    assert.is(missing, `ENOENT: ${disk}/f`);
    // mkdir refused above BACKUP_DIR, on the way to it: named with where it is.
    load({ BACKUP_DIR: '/srv/a/b/backups' });
    const above = { code: 'EACCES', syscall: 'mkdir', path: '/srv/a' };
    const uid = process.getuid!();
    assert.is(
      errorText(Object.assign(new Error('x'), above)),
      `EACCES: /srv/a (BACKUP_DIR is /srv/a/b/backups: uid ${uid} is not allowed there; run as the directory's owner, give it to uid ${uid}, or set BACKUP_DIR to another)`,
    );
  } finally {
    spawnSync('umount', [disk]);
  }
});

// -------------------------------------------------------------------------------------------
// End to end: the real scripts, as the admin runs them

/** Runs a script and kills it if it has not ended after RUN_LIMIT_MS (a hang fails the test). */
async function run(script: string, args: string[], env: Record<string, string>, cwd?: string): Promise<RunResult> {
  let timer: NodeJS.Timeout | undefined;
  const r = await runScript(script, args, env, {
    cwd,
    onSpawn: (pid) => (timer = setTimeout(() => process.kill(pid, 'SIGKILL'), RUN_LIMIT_MS)),
  });
  clearTimeout(timer);
  return r;
}

/** One case's own directory, state dir and environment for backup-verda on the fixture Verda (VERDA_HOST=local). */
function scene(name: string) {
  const root = path.join(work, name);
  const cwd = path.join(root, 'cwd');
  fs.mkdirSync(cwd, { recursive: true });
  const state = path.join(root, 'state');
  const r2 = { R2_ENDPOINT: s3.endpoint, R2_ACCESS_KEY_ID: SECRET, R2_SECRET_ACCESS_KEY: SECRET };
  return {
    root,
    cwd,
    state,
    backupDir: path.join(root, 'backups'),
    r2,
    verdaEnv: { ...verda.env, VERDA_HOST: 'local', COMFYMULTI_STATE_DIR: state },
  };
}

/** Exit 2 naming `name`, no stack, no step line, no request to R2, no state dir made. */
async function refusedRun(
  script: string,
  args: string[],
  env: Record<string, string>,
  name: string | RegExp,
  cwd?: string,
) {
  const requests = s3.requests.length;
  const stateBefore = env.COMFYMULTI_STATE_DIR && fs.existsSync(env.COMFYMULTI_STATE_DIR);
  const r = await run(script, args, env, cwd);
  const all = r.stdout + r.stderr;
  assert.is(r.code, 2, `${script} ${args.join(' ')}: ${r.signal ?? ''} ${all}`);
  assert.match(r.stderr, name);
  assert.not.match(all, STACK, 'no stack trace');
  assert.is(r.stdout, '', 'no step line');
  assert.is(s3.requests.length, requests, 'no request to R2');
  if (env.COMFYMULTI_STATE_DIR && !stateBefore) {
    assert.not.ok(fs.existsSync(env.COMFYMULTI_STATE_DIR), 'no state dir made');
  }
  return r;
}

test('e2e (6): BACKUP_DIR="/abs"  # note writes into /abs; a quoted secret reaches R2 without its quotes', async () => {
  const c = scene('e2e-quoted');
  // As an admin writes a .env: quotes, comments after them, export, CRLF from an editor.
  const file = envFile(
    'e2e-quoted.env',
    [
      '# Mello',
      `BACKUP_DIR="${c.backupDir}"  # where Verda's backups live`,
      `R2_ENDPOINT=${s3.endpoint} # loopback`,
      `export R2_ACCESS_KEY_ID="${SECRET}"`,
      `R2_SECRET_ACCESS_KEY='${SECRET}' # SigV4 is checked: "'${SECRET}'" would be refused`,
      '',
    ].join('\r\n'),
  );
  const r = await run('backup-verda.mts', ['--quick', '--env-file', file], c.verdaEnv, c.cwd);
  assert.is(r.code, 0, r.stdout + r.stderr);
  assert.not.match(r.stdout + r.stderr, STACK);
  assert.equal(fs.readdirSync(c.cwd), [], 'nothing under the working directory (no `"` directory)');
  const written = fs.readdirSync(c.backupDir);
  for (const kind of ['tailscale-identity', 'ssh-host-keys', 'project-env', 'home-dev', 'comfy-project', 'manifest']) {
    assert.ok(
      written.some((f) => f.startsWith(`${kind}-`)),
      `${kind} in ${c.backupDir}: ${written.join(' ')}`,
    );
  }
  const bundle = await s3.headObject(CACHE, 'verda-config-backup.tar.gz');
  assert.ok(bundle?.metadata.sha256, 'the bundle reached R2, signed with the unquoted secret');
});

test('e2e (6): a relative BACKUP_DIR is exit 2 naming it, and nothing is created', async () => {
  const c = scene('e2e-relative');
  const env = { ...c.verdaEnv, ...c.r2 };
  const relative = { ...env, BACKUP_DIR: 'backups/verda' };
  await refusedRun('backup-verda.mts', ['--quick'], relative, /^backup-verda: BACKUP_DIR .*absolute/, c.cwd);
  assert.equal(fs.readdirSync(c.cwd), [], 'nothing under the working directory');
  const quoted = envFile('e2e-relative.env', 'BACKUP_DIR="backups"  # relative, quoted\n');
  await refusedRun('backup-verda.mts', ['--quick', '--env-file', quoted], env, /BACKUP_DIR .*absolute/, c.cwd);
  assert.equal(fs.readdirSync(c.cwd), []);
});

test('e2e (6): an unterminated quote in the .env is exit 2 naming file:line', async () => {
  const c = scene('e2e-unterminated');
  const file = envFile('e2e-unterminated.env', `R2_ENDPOINT=${s3.endpoint}\nBACKUP_DIR="${c.backupDir}\n`);
  const env = { ...c.verdaEnv, ...c.r2 };
  await refusedRun('backup-verda.mts', ['--quick', '--env-file', file], env, `${file}:2: BACKUP_DIR`);
  assert.not.ok(fs.existsSync(c.backupDir));
});

test('e2e (7): CONTAINER_IMAGE=--help is exit 2 naming it; the good image archive stays', async () => {
  const c = scene('e2e-image');
  fs.mkdirSync(c.backupDir);
  const image = path.join(c.backupDir, 'worker-image.tar.gz');
  fs.writeFileSync(image, 'the good image');
  const env = { ...c.verdaEnv, ...c.r2, BACKUP_DIR: c.backupDir, CONTAINER_CLI: 'podman', CONTAINER_IMAGE: '--help' };
  await refusedRun('backup-verda.mts', [], env, /^backup-verda: CONTAINER_IMAGE /);
  assert.is(fs.readFileSync(image, 'utf8'), 'the good image');
  assert.equal(fs.readdirSync(c.backupDir), ['worker-image.tar.gz']);
});

test('e2e (10): VERDA_HOST or MELLO_HOST starting with "-" is exit 2 naming it, never reaching ssh', async () => {
  const c = scene('e2e-host');
  const env = { ...c.verdaEnv, ...c.r2, BACKUP_DIR: c.backupDir };
  const option = '-oProxyCommand=x';
  await refusedRun('backup-verda.mts', ['--quick'], { ...env, VERDA_HOST: option }, /^backup-verda: VERDA_HOST .*"-"/);
  assert.not.ok(fs.existsSync(c.backupDir));
  await refusedRun('backup-cron.mts', [], { ...env, MELLO_HOST: option }, /^backup-cron: MELLO_HOST .*"-"/);
  assert.not.ok(fs.existsSync(verda.sfsBackups), 'no SFS copy written');
});

test('e2e (15): R2_ENDPOINT with the bucket in its path is exit 2 naming it and the bucket variable', async () => {
  const c = scene('e2e-endpoint');
  const env = { ...c.r2, COMFYMULTI_STATE_DIR: c.state, MELLO_DATA_DIR: verda.home };
  const dashboardUrl = `${s3.endpoint}/${USER_FILES}`;
  const named = /^backup-mello: R2_ENDPOINT .*path.*R2_USER_FILES_BUCKET/;
  await refusedRun('backup-mello.mts', [], { ...env, R2_ENDPOINT: dashboardUrl }, named);
  const perBucket = { ...env, R2_USER_FILES_ENDPOINT: dashboardUrl };
  await refusedRun('backup-mello.mts', [], perBucket, /^backup-mello: R2_USER_FILES_ENDPOINT .*path/);
});

test('e2e (18d): R2_USER_FILES_BUCKET=a..b is exit 2 naming it', async () => {
  const c = scene('e2e-bucket');
  const env = { ...c.r2, COMFYMULTI_STATE_DIR: c.state, MELLO_DATA_DIR: verda.home, R2_USER_FILES_BUCKET: 'a..b' };
  const named = /^backup-mello: R2_USER_FILES_BUCKET is not a valid bucket name: "a\.\.b"/;
  await refusedRun('backup-mello.mts', [], env, named);
});

test('e2e (18b): BACKUP_DIR, SFS_BACKUP_DIR or COMFYMULTI_STATE_DIR that is a file is exit 2 naming it', async () => {
  const c = scene('e2e-dir-is-file');
  const file = path.join(c.root, 'a-file');
  fs.writeFileSync(file, 'not a directory');
  const env = { ...c.verdaEnv, ...c.r2 };
  const notDir = (script: string, name: string) =>
    new RegExp(`^${script}: ${name} is not a directory: .* a regular file`);
  await refusedRun('backup-verda.mts', ['--quick'], { ...env, BACKUP_DIR: file }, notDir('backup-verda', 'BACKUP_DIR'));
  const below = { ...env, BACKUP_DIR: path.join(file, 'sub') };
  await refusedRun('backup-verda.mts', ['--quick'], below, /^backup-verda: BACKUP_DIR: .*cannot be created/);
  await refusedRun('backup-cron.mts', [], { ...env, SFS_BACKUP_DIR: file }, notDir('backup-cron', 'SFS_BACKUP_DIR'));
  const mello = { ...c.r2, MELLO_DATA_DIR: verda.home, COMFYMULTI_STATE_DIR: c.state };
  const stateIsFile = { ...mello, COMFYMULTI_STATE_DIR: file };
  await refusedRun('backup-mello.mts', [], stateIsFile, notDir('backup-mello', 'COMFYMULTI_STATE_DIR'));
  const dataIsFile = { ...mello, MELLO_DATA_DIR: file };
  await refusedRun('backup-mello.mts', [], dataIsFile, notDir('backup-mello', 'MELLO_DATA_DIR'));
  assert.is(fs.readFileSync(file, 'utf8'), 'not a directory');
});

test('e2e: an --env-file that is a FIFO is exit 2 at once, never blocking', async () => {
  const c = scene('e2e-fifo');
  const fifo = path.join(c.root, 'fifo.env');
  assert.is(spawnSync('mkfifo', [fifo]).status, 0, 'mkfifo');
  const started = Date.now();
  const env = { ...c.r2, COMFYMULTI_STATE_DIR: c.state, MELLO_DATA_DIR: verda.home };
  const named = `backup-mello: --env-file ${fifo}: cannot be read (a FIFO, not a regular file)`;
  await refusedRun('backup-mello.mts', ['--env-file', fifo], env, named);
  const verdaEnv = { ...c.verdaEnv, ...c.r2 };
  await refusedRun('backup-verda.mts', ['--quick', '--env-file', fifo], verdaEnv, `--env-file ${fifo}`);
  assert.ok(Date.now() - started < RUN_LIMIT_MS, 'ended by itself');
});

test('e2e: BACKUP_DIR full (ENOSPC) or not the user’s (as nobody: EPERM, EACCES) fails its steps naming BACKUP_DIR', async () => {
  const c = scene('e2e-backup-dir-errors');
  fs.mkdirSync(c.backupDir);
  assert.is(spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=16k', 'tmpfs', c.backupDir]).status, 0, 'mount');
  try {
    fs.writeFileSync(path.join(c.backupDir, 'filler'), Buffer.alloc(12 * 1024));
    const env = { ...c.verdaEnv, ...c.r2, BACKUP_DIR: c.backupDir, COMFYMULTI_R2_ATTEMPTS: '1' };
    const full = await run('backup-verda.mts', ['--quick'], env);
    assert.is(full.code, 1, out(full));
    const fullLine = `(BACKUP_DIR: its disk is full; free space there or set BACKUP_DIR to a directory on a larger disk)`;
    assert.match(
      full.stdout,
      new RegExp(`✗ ENOSPC: ${c.backupDir}/[a-z-]+-\\d{8}-\\d{6}\\.tar\\.gz \\(BACKUP_DIR: its disk is full`),
    );
    assert.match(full.stdout, `Step 13 (Manifest): ENOSPC: ${c.backupDir}/manifest-`);
    assert.match(full.stdout, fullLine);
  } finally {
    spawnSync('umount', [c.backupDir]);
  }
  // Root's directory, run as nobody (whose state dir is its own, reached through 0755 parents).
  fs.chmodSync(work, 0o755);
  fs.chmodSync(c.root, 0o755);
  const state = path.join(c.root, 'nobody-state');
  fs.mkdirSync(state);
  fs.chownSync(state, 65534, 65534);
  const env = { ...c.verdaEnv, ...c.r2, BACKUP_DIR: c.backupDir, COMFYMULTI_STATE_DIR: state };
  let timer: NodeJS.Timeout | undefined;
  const denied = await runScript('backup-verda.mts', ['--quick'], env, {
    asUser: 65534,
    onSpawn: (pid) => (timer = setTimeout(() => process.kill(pid, 'SIGKILL'), RUN_LIMIT_MS)),
  });
  clearTimeout(timer);
  assert.is(denied.code, 1, out(denied));
  assert.match(
    denied.stdout,
    new RegExp(
      `✗ (EPERM|EACCES): ${c.backupDir}\\S* \\(BACKUP_DIR: uid 65534 is not allowed there; run as the directory's owner, give it to uid 65534, or set BACKUP_DIR to another\\)`,
    ),
  );
  assert.not.match(denied.stdout + denied.stderr, STACK);
});

test('e2e: with no .env beside the scripts, a default MELLO_DATA_DIR that is not there says "no .env at PATH"', async () => {
  const dotenv = path.join(ROOT, '.env');
  if (fs.existsSync(dotenv)) {
    console.log(`  (${dotenv} exists in this checkout: the run would read it; the unit test above covers the case)`);
    return;
  }
  const home = path.join(work, 'e2e-no-dotenv-home');
  fs.mkdirSync(home);
  const r = await run('backup-mello.mts', [], { HOME: home, COMFYMULTI_STATE_DIR: path.join(home, 'state') });
  assert.is(r.code, 2, out(r));
  const expected = `backup-mello: MELLO_DATA_DIR does not exist: ${home}/projects/comfyui/data (the default; no .env at ${dotenv})`;
  assert.is(r.stderr.trim(), expected);
});

test.run();
