// --status (issue 11): the real scripts after real runs (backup-mello and backup-verda against
// s3rver, backup-cron on a fixture Verda with Mello on this machine). Each status run must change
// nothing: no SSH (an `ssh` on PATH records any call), no R2 request but reads (none at all for
// backup-mello and backup-cron), nothing written in the state or backup directories.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { humanAge, type StatusReport } from '../lib/status.ts';
import { timestamp } from '../lib/dated.ts';
import {
  closedPort,
  runScript,
  ROOT,
  SECRET,
  startS3,
  tempDir,
  writeHeldLock,
  writeTree,
  type S3Server,
  out,
} from './helpers.ts';
import { makeVerda } from './verda-fixture.ts';

const USER_FILES = 'comfy-multi-user-files';
const CACHE = 'comfy-multi-cache';
const MODELS = 'comfy-multi-model-vault-backup';
const FAST = { COMFYMULTI_R2_TIMEOUT: '3', COMFYMULTI_R2_BACKOFF: '0.05', COMFYMULTI_COMMAND_TIMEOUT: '3' };
const HOUR = 3600_000;
const KINDS = ['tailscale-identity', 'ssh-host-keys', 'fail2ban', 'ufw', 'project-env'];

let s3: S3Server;
let work: string;
let fakeBin: string;
let sshCalls: string;

/** The fake ssh first on PATH: any ssh the script starts is recorded (and fails). */
const run = (script: string, args: string[], env: Record<string, string>, limitMs = 90_000) =>
  runScript(script, args, env, { limitMs, pathFirst: [fakeBin] });

/** Every entry under the roots: type, mode, size, mtime and content hash. Equal before and after: nothing written. */
function snapshot(...roots: string[]): Record<string, string> {
  const found: Record<string, string> = {};
  const visit = (p: string) => {
    const st = fs.lstatSync(p, { throwIfNoEntry: false });
    if (!st) return void (found[p] = 'absent');
    const hash = st.isFile() ? crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex') : '';
    found[p] = `${st.mode.toString(8)} ${st.size} ${st.mtimeMs} ${hash}`;
    if (st.isDirectory()) for (const name of fs.readdirSync(p)) visit(path.join(p, name));
  };
  roots.forEach(visit);
  return found;
}

/**
 * --status, twice (screen and --json), checked to have changed nothing: the snapshot of `roots`,
 * no ssh started, and R2 only read (`r2: 'none'`: not a single request).
 */
async function status(script: string, env: Record<string, string>, roots: string[], r2: 'none' | 'reads') {
  const before = snapshot(...roots);
  const requestsBefore = s3.requests.length;
  const screen = await run(script, ['--status'], env);
  const json = await run(script, ['--status', '--json'], env);
  assert.equal(snapshot(...roots), before, 'nothing written');
  assert.not.ok(fs.existsSync(sshCalls), `no ssh: ${fs.existsSync(sshCalls) ? fs.readFileSync(sshCalls, 'utf8') : ''}`);
  const requests = s3.requests.slice(requestsBefore);
  if (r2 === 'none') assert.equal(requests, [], 'no R2 request');
  else
    assert.ok(
      requests.every((q) => q.method === 'GET' || q.method === 'HEAD'),
      `R2 reads only: ${JSON.stringify(requests)}`,
    );
  let report: StatusReport;
  try {
    report = JSON.parse(json.stdout) as StatusReport;
  } catch {
    throw new Error(`--json is not JSON:\n${out(json)}`);
  }
  assert.is(json.code, screen.code, 'the same verdict as the screen');
  assert.is(report.ok, json.code === 0);
  assert.not.match(screen.stdout + screen.stderr, /\n\s+at /, 'no stack');
  return { screen, report, code: screen.code, text: screen.stdout };
}

/** Moves a dated name's stamp `hours` back (and the file's times): `kind-T.ext` → `kind-T'.ext`. */
function ageDated(dir: string, name: string, hours: number): string {
  const m = /^(.*)-(\d{8}-\d{6})\.(.*)$/.exec(name)!;
  const t = m[2];
  const then = new Date(
    Number(t.slice(0, 4)),
    Number(t.slice(4, 6)) - 1,
    Number(t.slice(6, 8)),
    Number(t.slice(9, 11)),
    Number(t.slice(11, 13)),
    Number(t.slice(13, 15)),
  );
  const older = new Date(then.getTime() - hours * HOUR);
  const renamed = `${m[1]}-${timestamp(older)}.${m[3]}`;
  fs.renameSync(path.join(dir, name), path.join(dir, renamed));
  fs.utimesSync(path.join(dir, renamed), older, older);
  return renamed;
}

/** Sets a last-run record's end (and the file's times) `hours` back. */
function ageLastRun(stateDir: string, script: string, hours: number) {
  const file = path.join(stateDir, `last-run-${script}.json`);
  const record = JSON.parse(fs.readFileSync(file, 'utf8'));
  const ended = new Date(Date.now() - hours * HOUR);
  record.startedAt = new Date(ended.getTime() - 60_000).toISOString();
  record.endedAt = ended.toISOString();
  fs.writeFileSync(file, JSON.stringify(record));
  fs.utimesSync(file, ended, ended);
}

test.before(async () => {
  s3 = await startS3([USER_FILES, CACHE, MODELS]);
  work = tempDir('status');
  fakeBin = path.join(work, 'bin');
  sshCalls = path.join(work, 'ssh-calls');
  fs.mkdirSync(fakeBin);
  fs.writeFileSync(path.join(fakeBin, 'ssh'), `#!/bin/sh\nprintf '%s\\n' "$*" >> '${sshCalls}'\nexit 255\n`, {
    mode: 0o755,
  });
});

test.after(async () => {
  await s3.stop();
  fs.rmSync(work, { recursive: true, force: true });
});

test('ages read as an admin reads them', () => {
  assert.is(humanAge(0.2), '12 min');
  assert.is(humanAge(3.2), '3 h 12 min');
  assert.is(humanAge(30), '30 h');
  assert.is(humanAge(52), '2 d 4 h');
  assert.is(humanAge(-1), 'in the future');
});

// ---------------------------------------------------------------------------------------------
// backup-mello

test('backup-mello --status: fresh, after a good run, after a failed one, and when old', async () => {
  const root = path.join(work, 'mello');
  const data = path.join(root, 'data');
  const state = path.join(root, 'state');
  writeTree(data, { 'user_data/user001/flow.json': '{}', 'inputs/a.png': 'png', 'outputs/user001/o.png': 'out' });
  const env = {
    R2_ENDPOINT: s3.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    COMFYMULTI_STATE_DIR: state,
    MELLO_DATA_DIR: data,
    ...FAST,
  };
  const roots = [state, data];

  const fresh = await status('backup-mello.mts', env, roots, 'none');
  assert.is(fresh.code, 1, out(fresh.screen));
  assert.match(fresh.text, /✗ no backup yet: no run of backup-mello is recorded/);
  assert.is(fresh.report.lastRun, null);

  const good = await run('backup-mello.mts', [], env);
  assert.is(good.code, 0, out(good));
  assert.is(fs.statSync(path.join(state, 'last-run-backup-mello.json')).mode & 0o777, 0o600);
  const ok = await status('backup-mello.mts', env, roots, 'none');
  assert.is(ok.code, 0, out(ok.screen));
  assert.match(ok.text, /^Last run: ✓ ok, full, ended .* \(\d+ min ago\), sent \S+$/m, ok.text);
  assert.match(ok.text, /✓ nothing flagged/);
  assert.equal(ok.report.flagged, []);
  assert.is(ok.report.lastRun?.exitCode, 0);
  assert.ok(ok.report.lastRun!.bytesSent > 0);

  // While a run holds the lock, --status still reads (it takes no lock) and says so.
  writeHeldLock(path.join(state, 'backup-mello.lock'), 'backup-mello');
  const during = await status('backup-mello.mts', env, roots, 'none');
  fs.rmSync(path.join(state, 'backup-mello.lock'));
  assert.is(during.code, 0, out(during.screen));
  assert.match(during.text, new RegExp(`running now: pid ${process.pid}`));
  assert.is(during.report.running?.pid, process.pid);

  const failed = await run('backup-mello.mts', ['--quick'], {
    ...env,
    R2_ENDPOINT: `http://127.0.0.1:${await closedPort()}`,
    COMFYMULTI_R2_ATTEMPTS: '1',
  });
  assert.is(failed.code, 1, out(failed));
  const bad = await status('backup-mello.mts', env, roots, 'none');
  assert.is(bad.code, 1, out(bad.screen));
  assert.match(bad.text, /^Last run: ✗ failed \(exit 1\), quick/m, bad.text);
  assert.match(
    bad.text,
    /✗ the last run \(ended .*\) failed \(exit 1\): User data \(workflows, settings\), Inputs/,
    bad.text,
  );
  assert.equal(bad.report.lastRun?.failedSteps, ['User data (workflows, settings)', 'Inputs']);

  const again = await run('backup-mello.mts', [], env);
  assert.is(again.code, 0, out(again));
  ageLastRun(state, 'backup-mello', 30);
  const old = await status('backup-mello.mts', env, roots, 'none');
  assert.is(old.code, 1, out(old.screen));
  assert.match(old.text, /✗ the last run ended 30 h old \(STALE_HOURS is 26\)/, old.text);
  const lenient = await status('backup-mello.mts', { ...env, STALE_HOURS: '48' }, roots, 'none');
  assert.is(lenient.code, 0, out(lenient.screen));

  for (const bad of ['0', '-3', 'a day', '1e3']) {
    const r = await run('backup-mello.mts', ['--status'], { ...env, STALE_HOURS: bad });
    assert.is(r.code, 2, `${bad}\n${out(r)}`);
    assert.match(r.stderr, /STALE_HOURS must be a number of hours/);
  }
  for (const flag of ['--dry-run', '--verify']) {
    const r = await run('backup-mello.mts', ['--status', flag], env);
    assert.is(r.code, 2, out(r));
    assert.match(r.stderr, new RegExp(`--status and ${flag} cannot be used together`));
  }
});

// ---------------------------------------------------------------------------------------------
// backup-verda

function verdaSetup(name: string) {
  const v = makeVerda(path.join(work, name));
  const backups = path.join(work, name, 'backups');
  const state = path.join(work, name, 'state');
  const env = {
    ...v.env,
    ...FAST,
    BACKUP_DIR: backups,
    COMFYMULTI_STATE_DIR: state,
    R2_ENDPOINT: s3.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    R2_CACHE_BUCKET: CACHE,
  };
  // The backups run with Verda on this machine; --status is given an SSH destination it must not use.
  return {
    backups,
    state,
    backupEnv: { ...env, VERDA_HOST: 'local' },
    statusEnv: { ...env, VERDA_HOST: 'dev@verda.invalid' },
  };
}

test('backup-verda --status: fresh, after a good run (artifacts, sizes, R2 bundle), after a failed one', async () => {
  const v = verdaSetup('verda');
  const roots = [v.backups, v.state];
  const fresh = await status('backup-verda.mts', v.statusEnv, roots, 'reads');
  assert.is(fresh.code, 1, out(fresh.screen));
  assert.match(fresh.text, /✗ no backup yet: no manifest-\*\.json in BACKUP_DIR/);

  const good = await run('backup-verda.mts', ['--quick'], v.backupEnv);
  assert.is(good.code, 0, out(good));
  const ok = await status('backup-verda.mts', v.statusEnv, roots, 'reads');
  assert.is(ok.code, 0, out(ok.screen));
  const newest = ok.report.verda!.newest!;
  assert.ok(newest.complete);
  assert.is(newest.mode, 'quick');
  assert.equal(
    newest.artifacts.map((a) => a.kind),
    [
      'tailscale-identity',
      'ssh-host-keys',
      'fail2ban',
      'ufw',
      'project-env',
      'home-dev',
      'comfy-project',
      'ohmyzsh-custom',
      'tailscale-ip.txt',
    ],
  );
  assert.ok(newest.artifacts.every((a) => a.state === 'present' && a.bytes > 0));
  assert.match(ok.text, /^ {2}✓ complete, quick, /m);
  assert.match(ok.text, /^ {4}home-dev\s+\d+(\.\d)?K$/m);
  const r2 = ok.report.verda!.r2;
  assert.is(r2.state, 'read');
  assert.match(r2.latest?.sha256 ?? '', /^[0-9a-f]{64}$/);
  assert.is(r2.datedCopies, 1);
  assert.match(ok.text, /newest dated copy: verda-config-backups\/verda-config-backup-\d{8}-\d{6}\.tar\.gz/);

  // A bundle step that cannot reach R2: the manifest records the failure, --status names it.
  await new Promise((r) => setTimeout(r, 1100)); // another second: another stamp
  const refused = `http://127.0.0.1:${await closedPort()}`;
  const failed = await run('backup-verda.mts', ['--quick'], {
    ...v.backupEnv,
    R2_ENDPOINT: refused,
    COMFYMULTI_R2_ATTEMPTS: '1',
  });
  assert.is(failed.code, 1, out(failed));
  const bad = await status('backup-verda.mts', v.statusEnv, roots, 'reads');
  assert.is(bad.code, 1, out(bad.screen));
  assert.match(
    bad.text,
    /✗ the newest backup, manifest-\d{8}-\d{6}\.json, is incomplete: Config bundle to R2 failed/,
    bad.text,
  );
  assert.match(bad.text, /^Newest whole restore point: manifest-/m, 'the older good one is shown');
  assert.equal(bad.report.verda!.newest!.failedSteps, ['Config bundle to R2']);
  assert.ok(bad.report.verda!.newestComplete?.complete);

  // R2 not configured: said, not flagged; R2 unreachable: flagged.
  const { R2_ENDPOINT: _, ...noR2 } = v.statusEnv;
  const unset = await status('backup-verda.mts', noR2, roots, 'none');
  assert.match(unset.text, /Config bundle in R2: not read \(R2 is not configured here\)/);
  assert.equal(unset.report.flagged, bad.report.flagged, 'no flag of its own');
  const down = await status(
    'backup-verda.mts',
    { ...v.statusEnv, R2_ENDPOINT: refused, COMFYMULTI_R2_ATTEMPTS: '1' },
    roots,
    'none',
  );
  assert.is(down.code, 1);
  assert.match(down.text, /✗ the bundle in R2 \(r2:\/\/comfy-multi-cache\) cannot be read: /, down.text);
});

test('backup-verda --status: a newest backup older than STALE_HOURS is flagged', async () => {
  const v = verdaSetup('verda-old');
  const good = await run('backup-verda.mts', ['--quick'], v.backupEnv);
  assert.is(good.code, 0, out(good));
  const fresh = await status('backup-verda.mts', v.statusEnv, [v.backups, v.state], 'reads');
  assert.is(fresh.code, 0, out(fresh.screen));
  // Thirty hours back: the manifest's name and stamp, and its file times.
  const name = fs.readdirSync(v.backups).find((n) => n.startsWith('manifest-'))!;
  const older = ageDated(v.backups, name, 30);
  const file = path.join(v.backups, older);
  const m = JSON.parse(fs.readFileSync(file, 'utf8'));
  m.timestamp = /manifest-(.*)\.json/.exec(older)![1];
  fs.writeFileSync(file, JSON.stringify(m));
  const old = await status('backup-verda.mts', v.statusEnv, [v.backups, v.state], 'reads');
  assert.is(old.code, 1, out(old.screen));
  assert.match(
    old.text,
    new RegExp(`✗ the newest backup, ${older.replace(/\./g, '\\.')}, is 30 h old \\(STALE_HOURS is 26\\)`),
    old.text,
  );
  assert.is(Math.round(old.report.verda!.newest!.ageHours), 30);
});

// ---------------------------------------------------------------------------------------------
// backup-cron

test('backup-cron --status: fresh, after a good run, copies confirmed by the last run, old, failed', async () => {
  const v = makeVerda(path.join(work, 'cron'));
  const state = path.join(work, 'cron', 'state');
  const data = path.join(work, 'cron', 'mello-data');
  writeTree(data, { 'user_data/user001/flow.json': '{}' });
  const env = {
    ...v.env,
    ...FAST,
    COMFYMULTI_STATE_DIR: state,
    R2_ENDPOINT: s3.endpoint,
    R2_ACCESS_KEY_ID: SECRET,
    R2_SECRET_ACCESS_KEY: SECRET,
    MELLO_DATA_DIR: data,
  };
  // backup-cron reaches Mello at MELLO_HOST=local; --status gets the default dev@mello, which it must not use.
  const cronEnv = { ...env, MELLO_HOST: 'local', MELLO_SCRIPTS_DIR: ROOT };
  const roots = [v.sfsBackups, state];

  const fresh = await status('backup-cron.mts', env, roots, 'none');
  assert.is(fresh.code, 1, out(fresh.screen));
  assert.match(fresh.text, /✗ no backup yet: no copy of any kind in SFS_BACKUP_DIR/);

  const good = await run('backup-cron.mts', [], cronEnv);
  assert.is(good.code, 0, out(good));
  const ok = await status('backup-cron.mts', env, roots, 'none');
  assert.is(ok.code, 0, out(ok.screen));
  assert.equal(
    ok.report.sfs!.kinds.map((k) => k.kind),
    KINDS,
  );
  for (const kind of KINDS) {
    const line = `^ {2}${kind}\\s+✓ ${kind}-\\d{8}-\\d{6}\\.tar\\.gz\\s+\\S+, \\d+ min old$`;
    assert.match(ok.text, new RegExp(line, 'm'));
  }

  // Unchanged sources are not written again: copies 30 h old that the last run found unchanged are current.
  for (const name of fs.readdirSync(v.sfsBackups)) ageDated(v.sfsBackups, name, 30);
  const stale = await status('backup-cron.mts', env, roots, 'none');
  assert.is(stale.code, 0, `the last run wrote them: current as of its end\n${out(stale.screen)}`);
  const rerun = await run('backup-cron.mts', [], cronEnv);
  assert.is(rerun.code, 0, out(rerun));
  assert.is(fs.readdirSync(v.sfsBackups).length, KINDS.length, 'nothing written again');
  const confirmed = await status('backup-cron.mts', env, roots, 'none');
  assert.is(confirmed.code, 0, out(confirmed.screen));
  const unchanged = /^ {2}ufw\s+✓ ufw-\S+\s+\S+, 30 h old, unchanged as of the last run$/m;
  assert.match(confirmed.text, unchanged, confirmed.text);

  // No run since: the copies and the last run are old.
  ageLastRun(state, 'backup-cron', 30);
  const old = await status('backup-cron.mts', env, roots, 'none');
  assert.is(old.code, 1, out(old.screen));
  for (const kind of KINDS)
    assert.match(
      old.text,
      new RegExp(
        `✗ the newest ${kind} copy, ${kind}-\\S+, is 30 h old \\(STALE_HOURS is 26\\), and no run since confirmed it`,
      ),
    );
  assert.match(old.text, /✗ the last run ended 30 h old/);

  // Mello out of reach: the SFS copies stand, the run failed, --status says which step.
  const failed = await run('backup-cron.mts', [], { ...cronEnv, MELLO_SCRIPTS_DIR: path.join(work, 'no such dir') });
  assert.is(failed.code, 1, out(failed));
  const bad = await status('backup-cron.mts', env, roots, 'none');
  assert.is(bad.code, 1, out(bad.screen));
  assert.match(bad.text, /✗ the last run \(ended .*\) failed \(exit 1\): Trigger backup-mello on Mello/, bad.text);
  assert.match(bad.text, /^ {2}✗ Step 7 \(Trigger backup-mello on Mello\): /m, bad.text);
  assert.equal(bad.report.lastRun?.failedSteps, ['Trigger backup-mello on Mello']);
  assert.is(bad.report.sfs!.kinds.length, 5, "backup-cron's five kinds");
  assert.ok(
    bad.report.sfs!.kinds.every((k) => !k.stale),
    'the run confirmed the copies',
  );
});

test.run();
