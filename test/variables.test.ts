// The one table of variables (lib/variables.ts) and what is made from it: the configuration
// reference and .env.example (a drift fails here), each script's --help, the defaults loadConfig
// takes, the variables added for issues 19, 20 and 23, and the warning for a name in .env that no
// script reads.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { UsageError } from '../lib/cli.ts';
import { bucketTarget, dotenvWarnings, loadConfig } from '../lib/config.ts';
import {
  SCRIPTS,
  VARIABLES,
  configurationMarkdown,
  editDistance,
  envExample,
  nearestVariable,
  RETIRED,
  variablesOf,
  type Variable,
} from '../lib/variables.ts';
import { ROOT, SECRET, out, runScript, startS3, tempDir, writeTree, type S3Server } from './helpers.ts';

const USER_FILES = 'comfy-multi-user-files';
const RUN_LIMIT_MS = 30_000;

let work: string;
let noEnvDir: string;
let s3: S3Server;

test.before(async () => {
  work = tempDir('variables');
  noEnvDir = path.join(work, 'no-env');
  fs.mkdirSync(noEnvDir);
  s3 = await startS3([USER_FILES]);
});

test.after(async () => {
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

const load = (env: Record<string, string>, envFile?: string) =>
  loadConfig({ HOME: '/home/admin', ...env }, noEnvDir, envFile);

function refuses(fn: () => unknown, name: string | RegExp): string {
  try {
    fn();
  } catch (e) {
    assert.instance(e, UsageError, `a UsageError, not ${String(e)}`);
    assert.match((e as Error).message, name);
    return (e as Error).message;
  }
  assert.unreachable(`accepted, expected a refusal naming ${name}`);
  return '';
}

// -------------------------------------------------------------------------------------------
// The table

/** SPEC.md's "Configuration" table, one name a row, and the limits lib/config.ts reads. */
const SPEC_VARIABLES = [
  'R2_ENDPOINT',
  'R2_ACCESS_KEY_ID',
  'R2_SECRET_ACCESS_KEY',
  'R2_MODELS_BUCKET',
  'R2_CACHE_BUCKET',
  'R2_USER_FILES_BUCKET',
  'R2_MODELS_ENDPOINT',
  'R2_CACHE_ENDPOINT',
  'R2_USER_FILES_ENDPOINT',
  'VERDA_HOST',
  'MELLO_HOST',
  'SSH_CONFIG',
  'BACKUP_DIR',
  'MELLO_DATA_DIR',
  'MELLO_SCRIPTS_DIR',
  'VERDA_SYSROOT',
  'VERDA_SUDO',
  'VERDA_HOME',
  'VERDA_PROJECT_DIR',
  'VERDA_MODELS_DIR',
  'VERDA_SCRIPTS_DIR',
  'SFS_BACKUP_DIR',
  'CONTAINER_CLI',
  'CONTAINER_IMAGE',
  'KEEP_BACKUPS',
  'COMFYMULTI_STATE_DIR',
  'R2_MODELS_ACCESS_KEY_ID',
  'R2_MODELS_SECRET_ACCESS_KEY',
  'R2_CACHE_ACCESS_KEY_ID',
  'R2_CACHE_SECRET_ACCESS_KEY',
  'R2_USER_FILES_ACCESS_KEY_ID',
  'R2_USER_FILES_SECRET_ACCESS_KEY',
  'NOTIFY_URL',
  'NOTIFY_URL_VERDA',
  'NOTIFY_URL_MELLO',
  'NOTIFY_URL_CRON',
  'STALE_HOURS',
  'AGE_RECIPIENTS',
  'AGE_IDENTITY_FILE',
  'VERDA_SYSTEMCTL',
  'SFS_MOUNT',
  'STATS_INTERVAL',
  'R2_VERSIONS_BUCKET',
  'R2_VERSIONS_ENDPOINT',
  'KEEP_VERSIONS_DAYS',
  'DRILL_MAX_BYTES',
  'COMFYMULTI_R2_TIMEOUT',
  'COMFYMULTI_R2_ATTEMPTS',
  'COMFYMULTI_R2_BACKOFF',
  'COMFYMULTI_SSH_TIMEOUT',
  'COMFYMULTI_COMMAND_TIMEOUT',
  'COMFYMULTI_NOTIFY_TIMEOUT',
];

test('the table: every variable of the SPEC and the limits, once, each with a meaning and its scripts', () => {
  const names = VARIABLES.map((v) => v.name);
  assert.is(new Set(names).size, names.length, 'no name twice');
  // A retired name (no longer read) is not a row: a `.env` setting it is told why instead.
  for (const name of SPEC_VARIABLES) assert.ok(names.includes(name as never) || name in RETIRED, `${name} is a row`);
  for (const v of VARIABLES as readonly Variable[]) {
    assert.ok(v.meaning.length > 10, `${v.name} has a meaning`);
    assert.ok(v.scripts.length > 0, `${v.name} is read by some script`);
    for (const s of v.scripts) assert.ok((SCRIPTS as readonly string[]).includes(s), `${v.name}: ${s} is a script`);
    assert.ok(v.default === undefined || v.unset === undefined, `${v.name}: a value default or an unset text`);
  }
  // The secrets of SPEC's "Trust between the machines": the R2 keys and the ping URLs.
  const secrets = VARIABLES.filter((v) => (v as Variable).secret).map((v) => v.name);
  for (const name of names) {
    const secret = /(ACCESS_KEY_ID|SECRET_ACCESS_KEY)$/.test(name) || name.startsWith('NOTIFY_URL');
    assert.is(secrets.includes(name), secret, `${name} is ${secret ? '' : 'not '}a secret`);
  }
});

test('docs/configuration.md and .env.example are what `npm run docs` makes from the table (a drift fails)', () => {
  const docs = fs.readFileSync(path.join(ROOT, 'docs/configuration.md'), 'utf8');
  const example = fs.readFileSync(path.join(ROOT, '.env.example'), 'utf8');
  assert.ok(docs === configurationMarkdown(), 'docs/configuration.md differs from the table: run `npm run docs`');
  assert.ok(example === envExample(), '.env.example differs from the table: run `npm run docs`');
  for (const v of VARIABLES as readonly Variable[]) {
    assert.match(docs, `| \`${v.name}\` |`, `${v.name} in the reference`);
    if (v.group !== 'system') assert.match(example, new RegExp(`^(# )?${v.name}=`, 'm'), `${v.name} in .env.example`);
  }
  // .env.example read as a .env: no warning, and the defaults it shows are the defaults.
  assert.equal(dotenvWarnings(example, '.env.example'), []);
  const uncommented = example.split('\n').filter((l) => /^[A-Z]/.test(l));
  assert.equal(uncommented, ['R2_ENDPOINT=', 'R2_ACCESS_KEY_ID=', 'R2_SECRET_ACCESS_KEY='], 'only the required');
  const shown = example.split('\n').filter((l) => /^# [A-Z][A-Z0-9_]*=/.test(l));
  assert.is(shown.length + uncommented.length, VARIABLES.filter((v) => v.group !== 'system').length);
  for (const line of shown) {
    const [name, value] = line.slice(2).split(/=(.*)/s);
    assert.is(value, (VARIABLES as readonly Variable[]).find((v) => v.name === name)!.default ?? '', line);
  }
});

test('scripts/docs.mts writes exactly those two files', () => {
  const copy = path.join(work, 'docs-copy');
  fs.mkdirSync(path.join(copy, 'lib'), { recursive: true });
  fs.mkdirSync(path.join(copy, 'scripts'));
  fs.copyFileSync(path.join(ROOT, 'lib/variables.ts'), path.join(copy, 'lib/variables.ts'));
  fs.copyFileSync(path.join(ROOT, 'scripts/docs.mts'), path.join(copy, 'scripts/docs.mts'));
  fs.writeFileSync(path.join(copy, '.env.example'), 'stale\n');
  const r = spawnSync(process.execPath, ['--import', 'tsx', path.join(copy, 'scripts/docs.mts')], {
    cwd: ROOT,
    encoding: 'utf8',
  });
  assert.is(r.status, 0, r.stderr);
  assert.is(fs.readFileSync(path.join(copy, 'docs/configuration.md'), 'utf8'), configurationMarkdown());
  assert.is(fs.readFileSync(path.join(copy, '.env.example'), 'utf8'), envExample());
  assert.match(r.stdout, '.env.example: written');
});

test('.gitignore keeps .env and .env.* out of git, but not .env.example', () => {
  const ignored = (name: string) => spawnSync('git', ['check-ignore', '-q', name], { cwd: ROOT }).status === 0;
  for (const name of ['.env', '.env.mello', '.env.local']) assert.ok(ignored(name), `${name} ignored`);
  assert.not.ok(ignored('.env.example'), '.env.example is tracked');
});

// -------------------------------------------------------------------------------------------
// Defaults: loadConfig takes the table's

test('with nothing set, loadConfig takes every value default from the table', () => {
  const cfg = load({});
  const home = (p: string) => p.replace(/^~/, '/home/admin');
  const field: [string, unknown][] = [
    ['R2_MODELS_BUCKET', undefined],
    ['VERDA_HOST', cfg.verdaHost],
    ['MELLO_HOST', cfg.melloHost],
    ['BACKUP_DIR', cfg.backupDir],
    ['MELLO_DATA_DIR', cfg.melloDataDir],
    ['MELLO_SCRIPTS_DIR', cfg.melloScriptsDir],
    ['COMFYMULTI_STATE_DIR', cfg.stateDir],
    ['VERDA_SYSROOT', cfg.verdaSysroot],
    ['VERDA_SUDO', cfg.verdaSudo.join(' ')],
    ['VERDA_HOME', cfg.verdaHome],
    ['VERDA_PROJECT_DIR', cfg.verdaProjectDir],
    ['VERDA_MODELS_DIR', cfg.verdaModelsDir],
    ['SFS_BACKUP_DIR', cfg.sfsBackupDir],
    ['SFS_MOUNT', cfg.sfsMount],
    ['CONTAINER_CLI', cfg.containerCli],
    ['CONTAINER_IMAGE', cfg.containerImage],
    ['VERDA_SYSTEMCTL', cfg.verdaSystemctl.join(' ')],
    ['KEEP_BACKUPS', String(cfg.keepBackups)],
    ['KEEP_VERSIONS_DAYS', String(cfg.keepVersionsDays)],
    ['DRILL_MAX_BYTES', String(cfg.drillMaxBytes)],
    ['STATS_INTERVAL', String(cfg.statsIntervalS)],
    ['STALE_HOURS', String(cfg.staleHours)],
    ['COMFYMULTI_R2_TIMEOUT', String(cfg.limits.r2IdleTimeoutMs / 1000)],
    ['COMFYMULTI_R2_ATTEMPTS', String(cfg.limits.r2Attempts)],
    ['COMFYMULTI_R2_BACKOFF', String(cfg.limits.r2BackoffMs / 1000)],
    ['COMFYMULTI_SSH_TIMEOUT', String(cfg.limits.sshTimeoutS)],
    ['COMFYMULTI_COMMAND_TIMEOUT', String(cfg.limits.commandIdleTimeoutMs / 1000)],
    ['COMFYMULTI_NOTIFY_TIMEOUT', String(cfg.limits.notifyTimeoutMs / 1000)],
  ];
  for (const [name, value] of field) {
    const row = (VARIABLES as readonly Variable[]).find((v) => v.name === name)!;
    assert.ok(row.default !== undefined, `${name} has a value default`);
    if (value === undefined) continue;
    // MELLO_SCRIPTS_DIR keeps its `~` (Mello's shell expands it); the others are expanded here.
    assert.is(value, name === 'MELLO_SCRIPTS_DIR' ? row.default : home(row.default!), name);
  }
  const env = { R2_ENDPOINT: 'https://acc.r2.example', R2_ACCESS_KEY_ID: 'k', R2_SECRET_ACCESS_KEY: 's' };
  const withR2 = load(env);
  assert.is(bucketTarget(withR2, 'models').bucket, 'comfy-multi-model-vault-backup');
  assert.is(bucketTarget(withR2, 'cache').bucket, 'comfy-multi-cache');
  assert.is(bucketTarget(withR2, 'userFiles').bucket, 'comfy-multi-user-files');
  // Every value default in the table is checked above or here.
  const checked = new Set([...field.map(([n]) => n), 'R2_CACHE_BUCKET', 'R2_USER_FILES_BUCKET']);
  for (const v of VARIABLES as readonly Variable[]) {
    if (v.default !== undefined) assert.ok(checked.has(v.name), `${v.name}'s default is checked`);
  }
});

// -------------------------------------------------------------------------------------------
// The variables issues 19, 20 and 23 add

test('SFS_MOUNT: /mnt/sfs by default, empty turns the check off, must be absolute', () => {
  assert.is(load({}).sfsMount, '/mnt/sfs');
  assert.is(load({ SFS_MOUNT: '' }).sfsMount, undefined);
  assert.is(load({ SFS_MOUNT: '/srv/sfs/' }).sfsMount, '/srv/sfs');
  for (const bad of ['mnt/sfs', './sfs', '/a\nb']) refuses(() => load({ SFS_MOUNT: bad }), /^SFS_MOUNT /);
});

test('DRILL_MAX_BYTES, STATS_INTERVAL, KEEP_VERSIONS_DAYS: defaults, and a bad value is exit 2 naming it', () => {
  assert.is(load({ DRILL_MAX_BYTES: '1024' }).drillMaxBytes, 1024);
  assert.is(load({ STATS_INTERVAL: '0.5' }).statsIntervalS, 0.5);
  assert.is(load({ KEEP_VERSIONS_DAYS: '7' }).keepVersionsDays, 7);
  for (const bad of ['0', '-1', '1.5', '4G', 'x', '99999999999999999999', '1024 ']) {
    refuses(() => load({ DRILL_MAX_BYTES: bad }), /^DRILL_MAX_BYTES must be a whole number/);
  }
  for (const bad of ['0', '-1', 'x', '1m', '86401']) {
    refuses(() => load({ STATS_INTERVAL: bad }), /^STATS_INTERVAL must be a number of seconds/);
  }
  for (const bad of ['0', '1.5', 'x', '36501']) {
    refuses(() => load({ KEEP_VERSIONS_DAYS: bad }), /^KEEP_VERSIONS_DAYS must be a whole number/);
  }
});

test('the versions bucket: off when unset; its endpoint R2_VERSIONS_ENDPOINT, else user files, else R2; user-files keys', () => {
  const r2 = { R2_ENDPOINT: 'https://acc.r2.example', R2_ACCESS_KEY_ID: 'k', R2_SECRET_ACCESS_KEY: 's' };
  const off = load(r2);
  assert.is(off.versionsBucket, undefined);
  refuses(() => bucketTarget(off, 'versions'), /^R2_VERSIONS_BUCKET is not set .*versions .* off/);
  refuses(() => load({ ...r2, R2_VERSIONS_BUCKET: 'a..b' }), /^R2_VERSIONS_BUCKET is not a valid bucket name/);
  refuses(() => load({ ...r2, R2_VERSIONS_ENDPOINT: 'https://eu.example/b' }), /^R2_VERSIONS_ENDPOINT .*path/);

  const on = { ...r2, R2_VERSIONS_BUCKET: 'comfy-multi-versions' };
  const shared = bucketTarget(load(on), 'versions');
  assert.equal(
    { bucket: shared.bucket, endpoint: shared.endpoint, id: shared.accessKeyId },
    { bucket: 'comfy-multi-versions', endpoint: 'https://acc.r2.example', id: 'k' },
  );
  assert.is(load(on).versionsBucket, 'comfy-multi-versions');
  const userFiles = {
    ...on,
    R2_USER_FILES_ENDPOINT: 'https://acc.eu.r2.example',
    R2_USER_FILES_ACCESS_KEY_ID: 'uk',
    R2_USER_FILES_SECRET_ACCESS_KEY: 'us',
    R2_CACHE_ACCESS_KEY_ID: 'ck',
    R2_CACHE_SECRET_ACCESS_KEY: 'cs',
  };
  const t = bucketTarget(load(userFiles), 'versions');
  assert.equal([t.endpoint, t.accessKeyId, t.secretAccessKey], ['https://acc.eu.r2.example', 'uk', 'us']);
  assert.is(t.variables?.accessKeyId, 'R2_USER_FILES_ACCESS_KEY_ID');
  assert.is(t.variables?.endpoint, 'R2_USER_FILES_ENDPOINT');
  const own = bucketTarget(load({ ...userFiles, R2_VERSIONS_ENDPOINT: 'https://v.eu.r2.example' }), 'versions');
  assert.equal([own.endpoint, own.variables?.endpoint], ['https://v.eu.r2.example', 'R2_VERSIONS_ENDPOINT']);
});

// -------------------------------------------------------------------------------------------
// Unknown names in .env

test('edit distance and the nearest known name: a slip of the fingers, not any name at all', () => {
  assert.is(editDistance('VERDA_HOTS', 'VERDA_HOST'), 1, 'a swap counts one');
  assert.is(editDistance('', 'ABC'), 3);
  assert.is(editDistance('KITTEN', 'SITTING'), 3);
  const cases: [string, string | undefined][] = [
    ['VERDA_HOTS', 'VERDA_HOST'],
    ['R2_ENDPIONT', 'R2_ENDPOINT'],
    ['r2_endpoint', 'R2_ENDPOINT'],
    ['BACKUPDIR', 'BACKUP_DIR'],
    ['R2_MODEL_BUCKET', 'R2_MODELS_BUCKET'],
    ['R2_USERFILES_BUCKET', 'R2_USER_FILES_BUCKET'],
    ['KEEP_BACKUP', 'KEEP_BACKUPS'],
    ['NOTIFY_URL_VERDA_X', 'NOTIFY_URL_VERDA'],
    ['HF_TOKEN', undefined],
    ['MY_OWN_SETTING', undefined],
  ];
  for (const [name, nearest] of cases) assert.is(nearestVariable(name), nearest, name);
});

test('.env: each name no script reads is one warning at file:line naming the nearest; the environment is not checked', () => {
  const file = path.join(work, 'typos.env');
  const text =
    'VERDA_HOTS=gpu\nBACKUP_DIR=/srv/b\n\nHF_TOKEN=x\nNO_COLOR=1\nVERDA_HOTS=again\nVERDA_SCRIPTS_DIR=/usr/local/bin\n';
  fs.writeFileSync(file, text);
  const warnings: string[] = [];
  const cfg = loadConfig({ HOME: '/home/admin', VERDA_HSOT: 'env' }, noEnvDir, file, {
    warn: (w) => warnings.push(w),
  });
  assert.is(cfg.backupDir, '/srv/b');
  assert.is(cfg.verdaHost, 'dev@verda', 'the misspelt name is not taken for the right one');
  assert.equal(warnings, [
    `${file}:1: VERDA_HOTS is not a variable of these scripts (ignored); did you mean VERDA_HOST?`,
    `${file}:4: HF_TOKEN is not a variable of these scripts (ignored); docs/configuration.md lists them`,
    `${file}:5: NO_COLOR is read from the environment only: in .env it does nothing`,
    `${file}:7: VERDA_SCRIPTS_DIR is no longer read (ignored): ${RETIRED.VERDA_SCRIPTS_DIR}`,
  ]);
  // The default .env beside the scripts is checked the same way.
  const beside = path.join(work, 'beside');
  fs.mkdirSync(beside);
  fs.writeFileSync(path.join(beside, '.env'), 'R2_ENDPIONT=https://acc.r2.example\n');
  const besideWarnings: string[] = [];
  loadConfig({ HOME: '/home/admin' }, beside, undefined, { warn: (w) => besideWarnings.push(w) });
  assert.equal(besideWarnings, [
    `${path.join(beside, '.env')}:1: R2_ENDPIONT is not a variable of these scripts (ignored); did you mean R2_ENDPOINT?`,
  ]);
  // Said before a configuration error, so the error does not hide its likely cause.
  const bad = path.join(work, 'typo-then-error.env');
  fs.writeFileSync(bad, 'KEEP_BACKUP=3\nKEEP_BACKUPS=none\n');
  const early: string[] = [];
  refuses(() => loadConfig({ HOME: '/h' }, noEnvDir, bad, { warn: (w) => early.push(w) }), /^KEEP_BACKUPS /);
  assert.equal(early, [
    `${bad}:1: KEEP_BACKUP is not a variable of these scripts (ignored); did you mean KEEP_BACKUPS?`,
  ]);
});

test('e2e: a misspelt name in --env-file is said once on stderr with the script name, and in --json notices', async () => {
  const data = path.join(work, 'mello-data');
  writeTree(data, { 'user_data/user001/flow.json': '{}', 'inputs/a.png': 'a', 'outputs/user001/o.png': 'o' });
  const file = path.join(work, 'mello.env');
  fs.writeFileSync(file, `R2_ENDPOINT=${s3.endpoint}\nVERDA_HOTS=gpu\nMELLO_DATA_DIR=${data}\n`);
  const env = {
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    COMFYMULTI_STATE_DIR: path.join(work, 'mello-state'),
    // The environment holds everyone's variables: never checked.
    VERDA_HSOT: 'not ours',
  };
  const r = await runScript('backup-mello.mts', ['--json', '--env-file', file], env, { limitMs: RUN_LIMIT_MS });
  assert.is(r.code, 0, out(r));
  const warning = `${file}:2: VERDA_HOTS is not a variable of these scripts (ignored); did you mean VERDA_HOST?`;
  const lines = r.stderr.split('\n').filter((l) => l.includes('VERDA_HOTS'));
  // Once at the start, prefixed by the script's name; the --json summary's step lines go to stderr
  // too, and the summary's ⚠ repeats the run's notices there.
  assert.is(lines[0], `backup-mello: ⚠ ${warning}`, out(r));
  assert.is(r.stderr.split(`backup-mello: ⚠ ${warning}`).length - 1, 1, 'said once with the name');
  assert.not.match(r.stdout + r.stderr, 'VERDA_HSOT');
  const summary = JSON.parse(r.stdout);
  assert.equal(summary.notices, [warning]);
  assert.ok(s3.requests.length > 0, 'and the run went on');
});

test('e2e: no warning in a run whose .env holds only known names (the notices stay empty)', async () => {
  const file = path.join(work, 'clean.env');
  fs.writeFileSync(file, `R2_ENDPOINT=${s3.endpoint}\nMELLO_DATA_DIR=${path.join(work, 'mello-data')}\n`);
  const env = { R2_ACCESS_KEY_ID: SECRET, R2_SECRET_ACCESS_KEY: SECRET, COMFYMULTI_STATE_DIR: path.join(work, 's2') };
  const r = await runScript('backup-mello.mts', ['--json', '--env-file', file], env, { limitMs: RUN_LIMIT_MS });
  assert.is(r.code, 0, out(r));
  assert.not.match(r.stderr, '⚠');
  assert.equal(JSON.parse(r.stdout).notices, []);
});

// -------------------------------------------------------------------------------------------
// --help

const HELP_SCRIPTS = SCRIPTS.filter((s) => fs.existsSync(path.join(ROOT, `${s}.mts`)));

test('--help of each script lists the variables it reads with their defaults, and no other', async () => {
  assert.ok(HELP_SCRIPTS.length >= 4, HELP_SCRIPTS.join(' '));
  for (const script of HELP_SCRIPTS) {
    const r = await runScript(`${script}.mts`, ['--help'], {}, { limitMs: RUN_LIMIT_MS });
    assert.is(r.code, 0, out(r));
    const section = r.stdout.split(/^Variables.*\n.*\n/m)[1];
    assert.ok(section, `${script}: a Variables section\n${r.stdout}`);
    const listed = section
      .trimEnd()
      .split('\n')
      .map((l) => /^ {2}([A-Z0-9_]+) +(.*?)(?: {2}\[secret\])?$/.exec(l));
    assert.ok(listed.every(Boolean), `${script}: every line is NAME DEFAULT\n${section}`);
    const expected = variablesOf(script).filter((v) => v.group !== 'system');
    assert.equal(
      listed.map((m) => m![1]),
      expected.map((v) => v.name),
      script,
    );
    for (const [i, v] of expected.entries()) {
      assert.is(listed[i]![2], v.default ?? `(${v.unset ?? 'none'})`, `${script}: ${v.name}'s default`);
    }
  }
});

test('--help lists each flag once, and --status only where the script has it (restore-verda has not)', async () => {
  for (const script of HELP_SCRIPTS) {
    const r = await runScript(`${script}.mts`, ['--help'], {}, { limitMs: RUN_LIMIT_MS });
    const flagLines = r.stdout.split('\n').filter((l) => /^ {2}(-\w, )?--[a-z-]+/.test(l));
    const flags = flagLines.map((l) => /--[a-z-]+/.exec(l)![0]);
    // restore-verda's --from has three lines, one per form.
    const distinct = flags.filter((f, i) => f === '--from' || flags.indexOf(f) === i);
    assert.equal(flags, distinct, `${script}: a flag described twice\n${r.stdout}`);
  }
  const restore = await runScript('restore-verda.mts', ['--help'], {}, { limitMs: RUN_LIMIT_MS });
  assert.not.match(restore.stdout, /^\s+--status/m, 'restore-verda refuses --status: not offered');
  assert.is(restore.stdout.match(/^\s+--verify/gm)?.length, 1, '--verify once');
  const status = await runScript('restore-verda.mts', ['--status'], {}, { limitMs: RUN_LIMIT_MS });
  assert.is(status.code, 2, 'and --status is indeed refused');
  const mello = await runScript('backup-mello.mts', ['--help'], {}, { limitMs: RUN_LIMIT_MS });
  assert.match(mello.stdout, /^\s+--status/m, 'backup-mello offers its --status');
});

test.run();
