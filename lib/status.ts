// --status: what is there, read without changing anything. No SSH, no upload, no lock (it works
// while a backup runs), nothing written. Each script's reader returns a typed report; the report
// flags what an admin must act on (the newest backup older than STALE_HOURS, incomplete, or
// missing; a failed last run), and --status exits 1 when anything is flagged, so a monitoring
// check can run it. The last-run record every backup run leaves in COMFYMULTI_STATE_DIR is
// written here too.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BUNDLE_KEY, BUNDLE_PREFIX, CRON_KINDS, configArchives, latestBundleKey, listBundles } from './archive.ts';
import { errorText, humanSize, localTime, printable } from './cli.ts';
import { bucketName, bucketTarget, type Config } from './config.ts';
import { isRegularFile, readRegularFileSync, writeFileAtomic } from './files.ts';
import { isHeld, type LockRecord } from './lock.ts';
import type { Manifest } from './manifest.ts';
import { requireSfs } from './sfs.ts';
import { LocalHost } from './ssh.ts';
import type { StepStatus } from './step.ts';
import { R2Backend, configuredBuckets } from './r2.ts';
import { datedPattern, localCopies, stampTime } from './dated.ts';
import { archiveKind } from './layout.ts';
import { PointJudge, listPoints, type Wholeness } from './restore-point.ts';

/** The dated copies' kind: `verda-config-backups/verda-config-backup-T.tar.gz`. */

const HOUR_MS = 3600_000;

// ---------------------------------------------------------------------------------------------
// The last-run record

/** How a backup run ended, kept in COMFYMULTI_STATE_DIR/last-run-SCRIPT.json (mode 0600). */
export interface LastRun {
  version: 1;
  script: string;
  host: string;
  mode: 'full' | 'quick';
  startedAt: string;
  endedAt: string;
  exitCode: number;
  ok: boolean;
  interrupted?: boolean;
  failedSteps: string[];
  /** The summary's failure lines (no secret: they are the printed ones). */
  failures: string[];
  /** Each step's status and the bytes it wrote or sent (none: it found its work already done). */
  steps: { name: string; status: StepStatus; bytes?: number }[];
  bytesSent: number;
}

const lastRunFile = (stateDir: string, script: string) => path.join(stateDir, `last-run-${script}.json`);

/** Written at the end of every backup run (not --dry-run, --verify or --status: they back nothing up). */
export function writeLastRun(stateDir: string, record: LastRun): void {
  writeFileAtomic(lastRunFile(stateDir, record.script), JSON.stringify(record, null, 2) + '\n', 0o600);
}

/** The record, none (`record` undefined, no problem), or why it could not be read. */
function readLastRun(stateDir: string, script: string): { record?: LastRun; problem?: string } {
  const file = lastRunFile(stateDir, script);
  let text: string;
  try {
    text = readRegularFileSync(file).toString('utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return {};
    return { problem: `${file} cannot be read (${errorText(e)})` };
  }
  try {
    const r = JSON.parse(text) as LastRun;
    if (typeof r.endedAt !== 'string' || Number.isNaN(Date.parse(r.endedAt)) || typeof r.exitCode !== 'number')
      throw new Error();
    return { record: { ...r, failedSteps: r.failedSteps ?? [], failures: r.failures ?? [], steps: r.steps ?? [] } };
  } catch {
    return { problem: `${file} is not a last-run record` };
  }
}

// ---------------------------------------------------------------------------------------------
// The report

interface LastRunStatus extends LastRun {
  ageHours: number;
}

interface ArtifactStatus {
  /** `home-dev`, `tailscale-ip.txt`, `worker-image.tar.gz`. */
  kind: string;
  name: string;
  bytes: number;
  /** Checked by stat for the newest backup only (--verify reads them). */
  state: 'present' | 'missing' | 'other size' | 'not checked';
}

interface VerdaBackupStatus {
  manifest: string;
  time: string;
  ageHours: number;
  mode: 'full' | 'quick';
  /** The run completed (the manifest's own word). */
  complete: boolean;
  /** As a restore point (lib/restore-point.ts): whole, broken, or unknown (what R2 holds could not be read). */
  restorePoint?: Wholeness;
  /** Why it is not whole, or what could not be checked. */
  why?: string[];
  failedSteps: string[];
  imageId?: string;
  artifacts: ArtifactStatus[];
  totalBytes: number;
}

interface R2BundleStatus {
  /** `not configured`: no R2 settings here (said, not flagged). `unreadable`: R2 did not answer or refused. */
  state: 'read' | 'not configured' | 'unreadable';
  bucket?: string;
  problem?: string;
  /** `verda-config-backup.tar.gz`, or `.tar.gz.age` when the newest bundle is encrypted. */
  latestKey?: string;
  latest?: { key: string; bytes: number; sha256?: string } | null;
  newestDated?: { key: string; time: string; ageHours: number } | null;
  datedCopies?: number;
}

interface VerdaStatus {
  backupDir: string;
  newest: VerdaBackupStatus | null;
  /** When the newest is not complete: the newest that is. */
  newestComplete?: VerdaBackupStatus | null;
  r2: R2BundleStatus;
}

interface SfsCopyStatus {
  kind: string;
  newest: string | null;
  time?: string;
  ageHours?: number;
  bytes?: number;
  /** The end of the last run that found this kind unchanged or wrote it: the copy is current as of then. */
  confirmedAt?: string;
  /** The last run found the source unchanged: it wrote no new copy. */
  unchanged?: boolean;
  /** The last run found none of this kind's sources: no copy is expected. */
  sourceAbsent?: boolean;
  stale: boolean;
}

interface SfsStatus {
  sfsBackupDir: string;
  kinds: SfsCopyStatus[];
}

export interface StatusReport {
  script: string;
  host: string;
  checkedAt: string;
  staleHours: number;
  /** Nothing flagged: --status exits 0. */
  ok: boolean;
  /** What to act on, one sentence each; any makes --status exit 1. */
  flagged: string[];
  /** Worth knowing, not a fault. */
  notes: string[];
  /** A run of the script holds its lock now. */
  running?: { pid?: number; host?: string; since?: string };
  lastRun: LastRunStatus | null;
  verda?: VerdaStatus;
  sfs?: SfsStatus;
}

const ageHoursOf = (time: Date, now: number) => Math.round(((now - time.getTime()) / HOUR_MS) * 10) / 10;

/** `45 min`, `3 h 12 min`, `2 d 4 h`; `in the future` for a negative age. */
export function humanAge(hours: number): string {
  if (hours < 0) return 'in the future';
  const min = Math.round(hours * 60);
  if (min < 60) return `${min} min`;
  if (min < 48 * 60) return `${Math.floor(min / 60)} h${min % 60 ? ` ${min % 60} min` : ''}`;
  return `${Math.floor(min / 1440)} d${Math.floor((min % 1440) / 60) ? ` ${Math.floor((min % 1440) / 60)} h` : ''}`;
}

const when = (iso: string, ageHours: number) => `${localTime(new Date(iso))} (${humanAge(ageHours)} ago)`;

/** The holder of the script's lock, if a run of it is going on now (read only: the lock is not touched). */
function runningNow(stateDir: string, script: string): StatusReport['running'] {
  const file = path.join(stateDir, `${script}.lock`);
  try {
    const ageMs = Date.now() - fs.lstatSync(file).mtimeMs;
    const record = JSON.parse(readRegularFileSync(file).toString('utf8')) as Partial<LockRecord>;
    return isHeld(record, script, ageMs) ? { pid: record.pid, host: record.host, since: record.started } : undefined;
  } catch {
    return undefined;
  }
}

/** The parts every report has, and the last run's flags. */
function baseReport(cfg: Config, script: string, now: number): StatusReport {
  const report: StatusReport = {
    script,
    host: os.hostname(),
    checkedAt: new Date(now).toISOString(),
    staleHours: cfg.staleHours,
    ok: true,
    flagged: [],
    notes: [],
    running: runningNow(cfg.stateDir, script),
    lastRun: null,
  };
  const { record, problem } = readLastRun(cfg.stateDir, script);
  if (problem) report.flagged.push(problem);
  if (record) {
    report.lastRun = { ...record, ageHours: ageHoursOf(new Date(record.endedAt), now) };
    if (!record.ok) {
      const what = record.interrupted ? 'was interrupted' : `failed (exit ${record.exitCode})`;
      const steps = record.failedSteps.length ? `: ${record.failedSteps.join(', ')}` : '';
      report.flagged.push(`the last run (ended ${localTime(new Date(record.endedAt))}) ${what}${steps}`);
    }
  }
  return report;
}

function done(report: StatusReport): StatusReport {
  report.ok = report.flagged.length === 0;
  return report;
}

const staleText = (ageHours: number, staleHours: number) => `${humanAge(ageHours)} old (STALE_HOURS is ${staleHours})`;

// ---------------------------------------------------------------------------------------------
// backup-mello: its last run

export async function melloStatus(cfg: Config, now = Date.now()): Promise<StatusReport> {
  const report = baseReport(cfg, 'backup-mello', now);
  const last = report.lastRun;
  if (!last && !report.flagged.length) {
    report.flagged.push(`no backup yet: no run of backup-mello is recorded in ${cfg.stateDir}`);
  } else if (last && last.ageHours > cfg.staleHours) {
    report.flagged.push(`the last run ended ${staleText(last.ageHours, cfg.staleHours)}`);
  }
  return done(report);
}

// ---------------------------------------------------------------------------------------------
// backup-verda: the newest backups in BACKUP_DIR, and the config bundle in R2

/** `home-dev-20260102-140305.tar.gz` → `home-dev`; undated names are their own kind. */
const artifactKind = (name: string) => archiveKind(name) ?? name;

/** A judge of restore points that only reads: a glance at R2 (two attempts, 10 s without a byte). */
function statusJudge(cfg: Config): PointJudge {
  const buckets = configuredBuckets(cfg, ['cache', 'models'], glance(cfg));
  return new PointJudge({
    backupDir: cfg.backupDir,
    buckets,
    cacheBucket: bucketName(cfg, 'cache'),
    stateDir: cfg.stateDir,
    signal: AbortSignal.timeout(60_000),
  });
}

const glance = (cfg: Config) => ({
  idleTimeoutMs: Math.min(cfg.limits.r2IdleTimeoutMs, 10_000),
  attempts: Math.min(cfg.limits.r2Attempts, 2),
  backoffMs: cfg.limits.r2BackoffMs,
});

function backupStatus(dir: string, name: string, m: Manifest, now: number, check: boolean): VerdaBackupStatus {
  const stamp = datedPattern('manifest', 'json').exec(name)![1];
  const time = stampTime(stamp);
  const artifacts = m.artifacts.map((a): ArtifactStatus => {
    let state: ArtifactStatus['state'] = 'not checked';
    if (check) {
      const file = path.join(dir, a.name);
      state = !isRegularFile(file) ? 'missing' : fs.lstatSync(file).size === a.bytes ? 'present' : 'other size';
    }
    return { kind: artifactKind(a.name), name: a.name, bytes: a.bytes, state };
  });
  return {
    manifest: name,
    time: time.toISOString(),
    ageHours: ageHoursOf(time, now),
    mode: m.mode,
    complete: m.complete && m.artifacts.length > 0,
    failedSteps: m.failedSteps ?? [],
    imageId: m.imageId,
    artifacts,
    totalBytes: artifacts.reduce((n, a) => n + a.bytes, 0),
  };
}

/** The bundle in the cache bucket: a HEAD of the latest key and a listing of the dated copies. Reads only. */
async function r2Bundle(cfg: Config, now: number): Promise<R2BundleStatus> {
  let target;
  try {
    target = bucketTarget(cfg, 'cache');
  } catch (e) {
    return { state: 'not configured', problem: errorText(e) };
  }
  // A status is a glance: two attempts, at most 10 s each without a byte moving, 30 s in all.
  const backend = new R2Backend(target, glance(cfg));
  const signal = AbortSignal.timeout(30_000);
  try {
    // Plain or age-encrypted (AGE_RECIPIENTS): the latest key is the newest dated copy's kind.
    const dated = await listBundles(backend, signal);
    const newest = dated[0];
    const latestKey = latestBundleKey(newest);
    const head = await backend.head(latestKey, signal);
    const time = newest && stampTime(newest.stamp);
    return {
      state: 'read',
      bucket: target.bucket,
      latestKey,
      latest: head ? { key: latestKey, bytes: head.size, sha256: head.metadata.sha256 } : null,
      newestDated:
        newest && time ? { key: newest.key, time: time.toISOString(), ageHours: ageHoursOf(time, now) } : null,
      datedCopies: dated.length,
    };
  } catch (e) {
    return {
      state: 'unreadable',
      bucket: target.bucket,
      problem: signal.aborted ? 'no answer within 30 s' : errorText(e),
    };
  } finally {
    await backend.destroy();
  }
}

export async function verdaStatus(cfg: Config, now = Date.now()): Promise<StatusReport> {
  const report = baseReport(cfg, 'backup-verda', now);
  const dir = cfg.backupDir;
  const flag = (text: string) => report.flagged.push(text);
  const points = listPoints(dir);
  const verda: VerdaStatus = { backupDir: dir, newest: null, r2: { state: 'not configured' } };
  report.verda = verda;
  // Whole or not, as rotation and the restore judge it; reads only (the hash cache is not saved).
  const judge = statusJudge(cfg);

  let newestManifest: Manifest | undefined;
  if (!points.length) flag(`no backup yet: no manifest-*.json in BACKUP_DIR (${dir})`);
  for (const [i, point] of points.entries()) {
    const name = point.name;
    const m = point.manifest;
    if (!m) {
      if (i === 0) {
        flag(`the newest manifest, ${name}, cannot be read (${point.readError})`);
        verda.newestComplete = null;
      }
      continue;
    }
    const b = backupStatus(dir, name, m, now, i === 0);
    const judgement = await judge.judge(point);
    b.restorePoint = judgement.state;
    b.why = judgement.why;
    if (i === 0) {
      verda.newest = b;
      newestManifest = m;
      if (b.ageHours > cfg.staleHours) flag(`the newest backup, ${name}, is ${staleText(b.ageHours, cfg.staleHours)}`);
      if (b.ageHours < -5 / 60)
        report.notes.push(`${name} is dated in the future (the clock was ahead when it was written)`);
      if (!b.complete) {
        const steps = b.failedSteps.length ? `: ${b.failedSteps.join(', ')} failed` : ': it holds no artifact';
        flag(`the newest backup, ${name}, is incomplete${steps}`);
      } else if (judgement.state === 'broken') {
        flag(`the newest backup, ${name}, is not a whole restore point: ${judgement.why.join('; ')}`);
      }
      if (judgement.state === 'unknown')
        flag(`the newest backup, ${name}, could not be checked whole: ${judgement.why.join('; ')}`);
      const gone = b.artifacts.filter((a) => a.state !== 'present');
      if (gone.length) {
        flag(
          `${gone.length} artifacts of ${name} are missing or changed size: ` +
            gone.map((a) => `${a.name} (${a.state})`).join(', '),
        );
      }
      if (judgement.state === 'whole') break;
      verda.newestComplete = null;
    } else if (judgement.state !== 'broken') {
      verda.newestComplete = b;
      break;
    }
  }
  if (points.length && verda.newestComplete === null) flag(`no whole restore point in BACKUP_DIR (${dir})`);

  verda.r2 = await r2Bundle(cfg, now);
  const r2 = verda.r2;
  if (r2.state === 'not configured') {
    report.notes.push(`the bundle in R2 was not read: ${r2.problem}`);
  } else if (r2.state === 'unreadable') {
    flag(`the bundle in R2 (r2://${r2.bucket}) cannot be read: ${r2.problem}`);
  } else {
    const where = `r2://${r2.bucket}`;
    const latestKey = r2.latestKey ?? BUNDLE_KEY;
    if (!r2.latest) flag(`no ${latestKey} in ${where}`);
    if (!r2.newestDated) flag(`no dated copy under ${where}/${BUNDLE_PREFIX}`);
    else if (r2.newestDated.ageHours > cfg.staleHours) {
      flag(`the newest bundle in R2, ${r2.newestDated.key}, is ${staleText(r2.newestDated.ageHours, cfg.staleHours)}`);
    }
    // The latest key holds the newest complete backup's bundle, as its manifest recorded it.
    const good = verda.newest?.complete ? newestManifest : undefined;
    const sent = good?.r2?.find((o) => o.key === latestKey && o.bucket === r2.bucket);
    if (sent && r2.latest?.sha256 && r2.latest.sha256 !== sent.sha256) {
      flag(`${where}/${latestKey} is not the bundle ${verda.newest!.manifest} recorded (another sha256)`);
    }
  }
  return done(report);
}

// ---------------------------------------------------------------------------------------------
// backup-cron: the newest SFS copy of each kind

export async function cronStatus(cfg: Config, now = Date.now()): Promise<StatusReport> {
  const report = baseReport(cfg, 'backup-cron', now);
  const dir = cfg.sfsBackupDir;
  // Cron runs on Verda: its copies are only SFS copies when SFS is mounted (lib/sfs.ts).
  await requireSfs(new LocalHost([]), cfg.sfsMount, dir, 'the copies in').catch((e) =>
    report.flagged.push(errorText(e)),
  );
  const last = report.lastRun;
  const titles = new Map(configArchives(cfg).map((s) => [s.kind, s.title]));
  const kinds = CRON_KINDS.map((kind): SfsCopyStatus => {
    const names = localCopies(dir, kind, 'tar.gz');
    const step = last?.steps.find((s) => s.name === titles.get(kind));
    // An archive equal to its newest copy is not written again: the copy of an unchanged source
    // grows old while every hourly run confirms it. A run's end confirms it when its step was ok.
    const confirmedAt = step?.status === 'ok' ? last!.endedAt : undefined;
    const unchanged = (confirmedAt && !step!.bytes) || undefined;
    const sourceAbsent = step?.status === 'skipped' || undefined;
    const s: SfsCopyStatus = { kind, newest: names[0] ?? null, confirmedAt, unchanged, sourceAbsent, stale: false };
    if (names[0]) {
      const time = stampTime(datedPattern(kind, 'tar.gz').exec(names[0])![1]);
      s.time = time.toISOString();
      s.ageHours = ageHoursOf(time, now);
      // A running backup may rotate it away meanwhile: then its size is not known.
      s.bytes = fs.lstatSync(path.join(dir, names[0]), { throwIfNoEntry: false })?.size;
      const current = confirmedAt ? Math.min(s.ageHours, ageHoursOf(new Date(confirmedAt), now)) : s.ageHours;
      s.stale = current > cfg.staleHours && !sourceAbsent;
    }
    return s;
  });
  report.sfs = { sfsBackupDir: dir, kinds };
  if (kinds.every((k) => !k.newest) && !kinds.some((k) => k.sourceAbsent)) {
    report.flagged.push(`no backup yet: no copy of any kind in SFS_BACKUP_DIR (${dir})`);
  } else {
    for (const k of kinds) {
      if (!k.newest && !k.sourceAbsent) report.flagged.push(`no copy of ${k.kind} in SFS_BACKUP_DIR (${dir})`);
      if (k.stale)
        report.flagged.push(
          `the newest ${k.kind} copy, ${k.newest}, is ${staleText(k.ageHours!, cfg.staleHours)}, ` +
            'and no run since confirmed it',
        );
    }
  }
  // Cron runs hourly: a last run this old means cron stopped.
  if (last && last.ageHours > cfg.staleHours)
    report.flagged.push(`the last run ended ${staleText(last.ageHours, cfg.staleHours)}`);
  return done(report);
}

// ---------------------------------------------------------------------------------------------
// The screen

export function statusText(r: StatusReport): string {
  const lines: string[] = [];
  const say = (text = '') => lines.push(text);
  say(`=== ${r.script} status on ${r.host}, ${localTime(new Date(r.checkedAt))} (stale after ${r.staleHours} h) ===`);
  if (r.running)
    say(
      `  running now: pid ${r.running.pid ?? '?'}${r.running.host ? ` on ${r.running.host}` : ''} ` +
        `since ${r.running.since ?? '?'}`,
    );

  if (r.verda) {
    const v = r.verda;
    const backup = (title: string, b: VerdaBackupStatus) => {
      say(`${title}: ${b.manifest}`);
      const result = b.complete
        ? '✓ complete'
        : `✗ incomplete${b.failedSteps.length ? ` (failed: ${b.failedSteps.join(', ')})` : ''}`;
      say(`  ${result}, ${b.mode}, ${when(b.time, b.ageHours)}`);
      if (b.restorePoint === 'whole') say('  ✓ a whole restore point');
      else if (b.restorePoint) {
        say(`  ✗ ${b.restorePoint === 'broken' ? 'not a whole restore point' : 'not checkable now'}:`);
        for (const why of b.why ?? []) say(`    ${why}`);
      }
      say(`  image: ${b.imageId ?? (b.mode === 'quick' ? 'not saved (quick run)' : 'none recorded')}`);
      const width = Math.max(...b.artifacts.map((a) => a.kind.length), 4);
      for (const a of b.artifacts) {
        const state = a.state === 'present' || a.state === 'not checked' ? '' : `  ✗ ${a.state}`;
        say(`    ${a.kind.padEnd(width)}  ${humanSize(a.bytes).padStart(6)}${state}`);
      }
      say(`    ${'total'.padEnd(width)}  ${humanSize(b.totalBytes).padStart(6)}  (${b.artifacts.length} artifacts)`);
    };
    say();
    if (v.newest) backup(`Newest backup in ${v.backupDir}`, v.newest);
    else say(`Newest backup in ${v.backupDir}: none`);
    if (v.newestComplete) backup('Newest whole restore point', v.newestComplete);
    say();
    const b = v.r2;
    if (b.state === 'not configured') say('Config bundle in R2: not read (R2 is not configured here)');
    else if (b.state === 'unreadable') say(`Config bundle in R2 (r2://${b.bucket}): ✗ cannot be read: ${b.problem}`);
    else {
      say(`Config bundle in R2 (r2://${b.bucket}):`);
      say(
        b.latest
          ? `  ${b.latest.key}: ${humanSize(b.latest.bytes)}, sha256 ${b.latest.sha256?.slice(0, 12) ?? 'not recorded'}`
          : `  ${b.latestKey ?? BUNDLE_KEY}: ✗ none`,
      );
      say(
        b.newestDated
          ? `  newest dated copy: ${b.newestDated.key}, ${when(b.newestDated.time, b.newestDated.ageHours)}; ` +
              `${b.datedCopies} in all`
          : `  dated copies: ✗ none`,
      );
    }
  }

  if (r.sfs) {
    say();
    say(`Newest SFS copies in ${r.sfs.sfsBackupDir}:`);
    const width = Math.max(...r.sfs.kinds.map((k) => k.kind.length));
    for (const k of r.sfs.kinds) {
      let text: string;
      if (!k.newest) text = k.sourceAbsent ? '– none (no source on Verda at the last run)' : '✗ none';
      else {
        const age = `${humanAge(k.ageHours!)} old${k.unchanged ? ', unchanged as of the last run' : ''}`;
        text = `${k.stale ? '✗' : '✓'} ${k.newest}  ${k.bytes === undefined ? '?' : humanSize(k.bytes)}, ${age}`;
      }
      say(`  ${k.kind.padEnd(width)}  ${text}`);
    }
  }

  say();
  const l = r.lastRun;
  if (!l) say('Last run: none recorded');
  else {
    const result = l.ok ? '✓ ok' : l.interrupted ? '✗ interrupted' : `✗ failed (exit ${l.exitCode})`;
    say(`Last run: ${result}, ${l.mode}, ended ${when(l.endedAt, l.ageHours)}, sent ${humanSize(l.bytesSent)}`);
    for (const f of l.failures) say(`  ✗ ${f}`);
  }

  say();
  for (const n of r.notes) say(`⚠ ${n}`);
  if (r.ok) say('✓ nothing flagged');
  else {
    say(`✗ ${r.flagged.length} flagged:`);
    for (const f of r.flagged) say(`  ✗ ${f}`);
  }
  return lines.map(printable).join('\n') + '\n';
}
