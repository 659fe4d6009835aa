// runScript is every script's main: flags, configuration, lock, signals, the plan (its steps
// run by lib/step.ts), the summary, the pings and the exit code. The top of the house: only the
// scripts import it.
import { setMaxListeners } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  EXIT,
  Output,
  UsageError,
  addNotice,
  errorText,
  exitAfterOutput,
  helpText,
  humanSize,
  localTime,
  notices,
  parseFlags,
  type ExtraFlags,
  type Flags,
} from './cli.ts';
import { DEFAULT_LIMITS, loadConfig, mergedEnv, readLimits, type Config } from './config.ts';
import { removeStalePartials } from './files.ts';
import { LockError, LockHeld, acquireLock } from './lock.ts';
import { Notifier, notifyTarget, pingBody, pingNotStarted, type NotifyTarget } from './notify.ts';
import { statusText, writeLastRun, type StatusReport } from './status.ts';
import { runPlan, type Step, type StepReport, type StepStatus } from './step.ts';

export interface ScriptDef {
  /** `backup-mello`: names the lock and the messages. */
  name: string;
  /** The first line printed. */
  title: (flags: Flags) => string;
  /** What the summary line calls a run (`Restore`, `Drill`); `Backup` unless said. */
  outcome?: (flags: Flags) => string;
  /** What the last line calls the bytes the steps moved (`restored`); `sent` unless said. */
  moved?: (flags: Flags) => string;
  /** Usage and what the script does, above the common flags. */
  usage: string;
  /** Backs nothing up (restore-verda): its runs ping a failure only, never a start or a success. */
  backsNothingUp?: boolean;
  extraFlags?: ExtraFlags;
  /**
   * Builds the plan (for --verify too: its steps then check instead of send); throws UsageError
   * for a configuration the plan cannot run with (asynchronously, too: AGE_RECIPIENTS is checked
   * by the age library, loaded on demand).
   */
  plan: (cfg: Config, flags: Flags) => Plan | Promise<Plan>;
  /** --status: what is there, read without changing anything (lib/status.ts). */
  status?: (cfg: Config) => Promise<StatusReport>;
  /** --list: the restore points (or SFS copies), newest first, as text or JSON; changes nothing. */
  list?: (cfg: Config, json: boolean) => Promise<string>;
}

export interface Plan {
  steps: Step[];
  /** Directories the run writes into: temporary files a killed run left there are removed first. */
  workDirs?: string[];
  /** Runs after the steps whatever happened (closes the SSH connection). */
  close?: () => Promise<void>;
  /** Lines for the run's summary once it is closed (the state restore-verda left each service in). */
  report?: () => string[];
}

/** Where the running script lives: `.env` is looked for beside it (a bundle's is its parent's). */
function scriptDir(): string {
  const main = process.argv[1];
  if (!main) return process.cwd();
  const dir = path.dirname(fs.realpathSync(main));
  return path.basename(dir) === 'dist' ? path.dirname(dir) : dir;
}

/** The script's arguments, without the `--` its launcher puts first (see the scripts' first lines). */
function scriptArgs(): string[] {
  const args = process.argv.slice(2);
  return args[0] === '--' ? args.slice(1) : args;
}

/**
 * Pings NOTIFY_URL (or the script's own variable) that the run stopped before it started, when
 * the URL can be read at all: from the configuration when it loaded, else from the environment
 * and `.env` as far as they read. Says on stderr when the ping could not be sent.
 */
async function pingNoStart(name: string, cfg: Config | undefined, envFile: string | undefined, why: string) {
  let target: NotifyTarget | undefined;
  let timeoutMs = DEFAULT_LIMITS.notifyTimeoutMs;
  try {
    let env: Record<string, string | undefined> = process.env;
    try {
      env = cfg?.env ?? mergedEnv(process.env, scriptDir(), envFile);
    } catch {
      /* the .env is what is wrong: the environment alone */
    }
    target = notifyTarget(env, name);
    timeoutMs = readLimits(env).notifyTimeoutMs;
  } catch {
    /* a malformed URL or timeout: the message above already says what to fix */
  }
  if (!target) return;
  const problem = await pingNotStarted(target, timeoutMs, name, why);
  if (problem) process.stderr.write(`${name}: ⚠ ${problem}\n`);
}

/** --status: the script's report as a screen or JSON; exit 1 when anything is flagged. */
async function showStatus(def: ScriptDef, cfg: Config, json: boolean): Promise<never> {
  let report: StatusReport;
  try {
    report = await def.status!(cfg);
  } catch (e) {
    process.stderr.write(`${def.name}: internal error: ${errorText(e)}\n`);
    return exitAfterOutput(EXIT.failed);
  }
  process.stdout.write(json ? JSON.stringify(report, null, 2) + '\n' : statusText(report));
  return exitAfterOutput(report.ok ? EXIT.ok : EXIT.failed);
}

/** --list: the script's restore points (or copies); exit 0, or 1 when they cannot be read. */
async function showList(def: ScriptDef, cfg: Config, json: boolean): Promise<never> {
  try {
    process.stdout.write(await def.list!(cfg, json));
  } catch (e) {
    process.stderr.write(`${def.name}: ${errorText(e)}\n`);
    return exitAfterOutput(EXIT.failed);
  }
  return exitAfterOutput(EXIT.ok);
}

/** The whole life of a script run. Never returns; exits with the SPEC's codes. */
export async function runScript(def: ScriptDef, argv = scriptArgs()): Promise<never> {
  const { flags, cfg, plan, notifier } = await prepare(def, argv);
  if (flags.status) return showStatus(def, cfg, flags.json);
  if (flags.list) return showList(def, cfg, flags.json);
  const out = new Output(flags.json, flags.verbose, cfg.statsIntervalS * 1000);
  const release = await takeLock(def, cfg, flags);
  notifier?.start();
  // What a killed run (SIGKILL, power loss) left half-written: its writer is gone.
  for (const dir of [cfg.stateDir, ...(plan.workDirs ?? [])]) removeStalePartials(dir);
  const signal = stopOnSignals(def, out, release);

  const started = Date.now();
  // Dated, as the summary is: a cron log is read by date.
  out.header(def.title(flags).replace(/ ===$/, `, ${localTime(new Date(started))} ===`));
  let reports: StepReport[];
  try {
    reports = await runPlan(plan.steps, { out, dryRun: flags.dryRun, verbose: flags.verbose, signal });
  } finally {
    await plan.close?.().catch(() => {});
    release();
  }
  const outcome = summarize(def, flags, reports, started, signal, plan.report?.() ?? []);
  if (!flags.dryRun && !flags.verify) recordLastRun(def, cfg, flags, outcome);
  const startProblem = await notifier?.settleStart();
  if (startProblem) notices.add(startProblem);

  out.plain('');
  out.header(`=== ${outcome.result}, ended ${localTime(new Date())} ===`);
  for (const f of outcome.failures) out.fail(f);
  for (const notice of notices) out.warn(notice);
  for (const line of outcome.report) out.info(line);
  if (outcome.moved) out.info(outcome.moved);
  if (notifier) {
    const endProblem = await notifier.end(outcome.code === EXIT.ok, pingBody(pingLines(def, flags, outcome)));
    if (endProblem) {
      notices.add(endProblem);
      out.warn(endProblem);
    }
  }
  if (flags.json) {
    const summary = {
      script: def.name,
      mode: flags.quick ? 'quick' : 'full',
      dryRun: flags.dryRun,
      verify: flags.verify,
      ok: outcome.code === EXIT.ok,
      exitCode: outcome.code,
      interrupted: signal.aborted || undefined,
      startedAt: new Date(started).toISOString(),
      durationMs: Date.now() - started,
      steps: reports,
      notices: [...notices],
      ...(outcome.report.length ? { report: outcome.report } : {}),
    };
    process.stdout.write(JSON.stringify(summary, null, 2) + '\n');
  }
  return exitAfterOutput(outcome.code);
}

/**
 * Flags, configuration and the plan, or the exit: `--help`; exit 2 for a usage or configuration
 * error (nothing was done; the message names the flag or variable); anything else is a bug, said
 * without a stack.
 */
async function prepare(def: ScriptDef, argv: string[]) {
  const notStarted = (e: unknown) => `${e instanceof UsageError ? '' : 'internal error: '}${errorText(e)}`;
  let flags: Flags;
  try {
    flags = parseFlags(argv, def.extraFlags);
  } catch (e) {
    // Not pinged: a mistyped flag is someone at a terminal, and nothing configured is wrong.
    process.stderr.write(`${def.name}: ${notStarted(e)}\n`);
    return exitAfterOutput(e instanceof UsageError ? EXIT.usage : EXIT.failed);
  }
  if (flags.help) {
    const shown = { status: Boolean(def.status), list: Boolean(def.list), failurePingsOnly: def.backsNothingUp };
    process.stdout.write(helpText(def.name, def.usage, shown));
    return exitAfterOutput(EXIT.ok);
  }
  let cfg: Config | undefined;
  try {
    // A name in .env that no script reads (a misspelling): said once, first, and in the summary.
    const warn = (text: string) => {
      process.stderr.write(`${def.name}: ⚠ ${text}\n`);
      addNotice(text);
    };
    cfg = loadConfig(process.env, scriptDir(), flags.envFile, { warn });
    if (flags.status && !def.status) throw new UsageError(`--status is not available for ${def.name}`);
    if (flags.list && !def.list) throw new UsageError(`--list is not available for ${def.name}`);
    const target = pings(flags) ? notifyTarget(cfg.env, def.name) : undefined;
    const notifier = target ? new Notifier(target, cfg.limits.notifyTimeoutMs, def.backsNothingUp) : undefined;
    const plan: Plan = flags.status || flags.list ? { steps: [] } : await def.plan(cfg, flags);
    return { flags, cfg, plan, notifier };
  } catch (e) {
    process.stderr.write(`${def.name}: ${notStarted(e)}\n`);
    if (pings(flags)) await pingNoStart(def.name, cfg, flags.envFile, notStarted(e));
    return exitAfterOutput(e instanceof UsageError ? EXIT.usage : EXIT.failed);
  }
}

/**
 * Only a backup run pings: a success ping from a run that backed nothing up (--dry-run,
 * --verify, --status) would tell the check that backups are being made.
 */
const pings = (flags: Flags) => !flags.dryRun && !flags.verify && !flags.status && !flags.list;

/** The script's lock, or the exit: 75 when another run holds it, 2 when it cannot be written. */
async function takeLock(def: ScriptDef, cfg: Config, flags: Flags): Promise<() => void> {
  try {
    return acquireLock(path.join(cfg.stateDir, `${def.name}.lock`), def.name);
  } catch (e) {
    if (e instanceof LockHeld) {
      // Not pinged: the holder pings when it ends, and one that never ends goes silent, which is
      // what the check's grace time is for. A /75 ping would mark a long, healthy run as failed.
      process.stderr.write(`${def.name}: ${e.message}; not starting\n`);
      return exitAfterOutput(EXIT.locked);
    }
    const why = `COMFYMULTI_STATE_DIR (${cfg.stateDir}): ${e instanceof LockError ? e.message : errorText(e)}`;
    process.stderr.write(`${def.name}: ${why}; nothing was done\n`);
    if (pings(flags)) await pingNoStart(def.name, cfg, flags.envFile, why);
    return exitAfterOutput(EXIT.usage);
  }
}

/**
 * The run's signal. First SIGINT/SIGTERM/SIGHUP: stop and clean up (partial files removed,
 * multipart uploads aborted). A second one: leave at once.
 */
function stopOnSignals(def: ScriptDef, out: Output, release: () => void): AbortSignal {
  const controller = new AbortController();
  // Every request in flight listens on it: many more than Node's default warning threshold.
  setMaxListeners(0, controller.signal);
  const onSignal = (sig: NodeJS.Signals) => {
    if (controller.signal.aborted) {
      // process.exit() itself waits for a blocked file system call; SIGKILL does not.
      release();
      process.stderr.write(`${def.name}: second ${sig}: leaving at once\n`);
      process.kill(process.pid, 'SIGKILL');
    }
    out.clearProgress();
    process.stderr.write(`\n${def.name}: ${sig} received, stopping and cleaning up\n`);
    controller.abort(new Error(sig));
  };
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, onSignal);
  // A bug that escapes every step (an error thrown in a callback) ends the run as an interrupt
  // does: the steps stop, the manifest records what was done, the summary and the /fail ping go.
  const onCrash = (e: unknown) => {
    if (controller.signal.aborted) return;
    out.clearProgress();
    process.stderr.write(`${def.name}: internal error: ${errorText(e)}; stopping\n`);
    controller.abort(new Error(`internal error: ${errorText(e)}`));
  };
  process.on('uncaughtException', onCrash);
  process.on('unhandledRejection', onCrash);
  return controller.signal;
}

interface RunSummary {
  code: number;
  /** `Backup FAILED in 3.2s: 9 ok, 1 skipped, 2 failed`. */
  result: string;
  /** Each failed step with its failures named: a cron log is read from its end. */
  failures: string[];
  failedSteps: string[];
  reports: StepReport[];
  started: number;
  bytes: number;
  /** `sent 1.2G in all`, or nothing. */
  moved: string;
  interrupted: boolean;
  /** The plan's own summary lines (Plan.report). */
  report: string[];
}

function summarize(
  def: ScriptDef,
  flags: Flags,
  reports: StepReport[],
  started: number,
  signal: AbortSignal,
  report: string[],
): RunSummary {
  const failed = reports.filter((r) => r.status === 'failed' || r.status === 'interrupted');
  const count = (status: StepStatus) => reports.filter((r) => r.status === status).length;
  const counts = `${count('ok')} ok, ${count('skipped')} skipped, ${failed.length} failed`;
  const what = flags.dryRun ? 'Dry run' : flags.verify ? 'Verify' : (def.outcome?.(flags) ?? 'Backup');
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  // Steps that failed only because a host could not be reached are one line, not one each.
  const repeats = failed.filter((r) => r.repeat);
  const failures = failed
    .filter((r) => !r.repeat)
    .map((r) => {
      const items = r.failures.slice(0, 5).concat(r.failures.length > 5 ? [`and ${r.failures.length - 5} more`] : []);
      return `Step ${r.step} (${r.name}): ${r.error ?? (items.length ? items.join('; ') : (r.summary ?? r.status))}`;
    });
  if (repeats.length) failures.push(repeatedLine(repeats));
  if (signal.aborted) failures.push(`interrupted by ${signal.reason?.message}`);
  const bytes = reports.reduce((n, r) => n + (r.bytes ?? 0), 0);
  const verb = flags.dryRun ? 'would send' : (def.moved?.(flags) ?? 'sent');
  return {
    code: failed.length ? EXIT.failed : EXIT.ok,
    result: `${what} ${failed.length ? 'FAILED' : 'complete'} in ${seconds}s: ${counts}`,
    failures,
    failedSteps: failed.map((r) => r.name),
    reports,
    started,
    bytes,
    moved: bytes && !flags.verify ? `${verb} ${humanSize(bytes)} in all` : '',
    interrupted: signal.aborted,
    report,
  };
}

/**
 * The one summary line of the steps that failed only for a host already said unreachable:
 * `Step 11 (Models): ...` for one, as any failed step, and `Steps 2, 3, 4: ...` for more.
 */
export function repeatedLine(repeats: StepReport[]): string {
  const why = repeats[0].error ?? 'not done';
  if (repeats.length === 1) return `Step ${repeats[0].step} (${repeats[0].name}): ${why}`;
  return `Steps ${repeats.map((r) => r.step).join(', ')}: ${why}`;
}

/** The record --status reads; one that cannot be written is a notice, not a failure. */
function recordLastRun(def: ScriptDef, cfg: Config, flags: Flags, outcome: RunSummary) {
  try {
    writeLastRun(cfg.stateDir, {
      version: 1,
      script: def.name,
      host: os.hostname(),
      mode: flags.quick ? 'quick' : 'full',
      startedAt: new Date(outcome.started).toISOString(),
      endedAt: new Date().toISOString(),
      exitCode: outcome.code,
      ok: outcome.code === EXIT.ok,
      interrupted: outcome.interrupted || undefined,
      failedSteps: outcome.failedSteps,
      failures: outcome.failures,
      steps: outcome.reports.map((r) => ({ name: r.name, status: r.status, bytes: r.bytes })),
      bytesSent: outcome.bytes,
    });
  } catch (e) {
    notices.add(`the run's record for --status was not written: ${errorText(e)}`);
  }
}

/** The ping's body: the summary as printed, then each step's line; never an environment value. */
function pingLines(def: ScriptDef, flags: Flags, outcome: RunSummary): string[] {
  return [
    `${def.name} on ${os.hostname()} (${flags.quick ? 'quick' : 'full'}): ${outcome.result}`,
    ...outcome.failures.map((f) => `✗ ${f}`),
    ...[...notices].map((n) => `⚠ ${n}`),
    ...outcome.report,
    ...(outcome.moved ? [outcome.moved] : []),
    '',
    ...outcome.reports.map((r) => {
      const mark = r.status === 'ok' ? '✓' : r.status === 'skipped' ? '–' : '✗';
      return `Step ${r.step} (${r.name}): ${mark} ${r.error ?? r.summary ?? r.status}`;
    }),
  ];
}
