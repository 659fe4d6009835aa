// A step is a value: its name, what it moves, and how to run it. The printed step lines,
// --dry-run and --json all come from the same plan. runScript is every script's main: flags,
// configuration, lock, signals, the plan, the summary and the exit code.
import { setMaxListeners } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import { COMMON_HELP, EXIT, Output, UsageError, errorText, exitAfterOutput, humanSize, notices, parseFlags, type Flags } from './cli.ts';
import { loadConfig, type Config } from './config.ts';
import { removeStalePartials } from './files.ts';
import { LockError, LockHeld, acquireLock } from './lock.ts';

export interface StepContext {
  out: Output;
  dryRun: boolean;
  verbose: boolean;
  signal: AbortSignal;
  /** The reports of the steps before this one, in order (see failedBefore). */
  earlier: StepReport[];
  /** The plan's steps, in the same order as the reports. */
  steps: Step[];
}

/**
 * The one rule for "did an earlier step fail": the steps before this one (or those of `among`)
 * that failed or were interrupted. The bundle, the manifest and rotation all ask it.
 */
export function failedBefore(ctx: StepContext, among?: Step[]): StepReport[] {
  return ctx.earlier.filter(
    (r, i) => (r.status === 'failed' || r.status === 'interrupted') && (!among || among.includes(ctx.steps[i])),
  );
}

export interface StepResult {
  /** The step's printed line: what was done, e.g. `1204 files (3.1G): 3 sent (12M), 1201 unchanged`. */
  summary: string;
  bytes?: number;
  /** `skipped`: nothing to do here (a missing optional source); with a warning, say why. */
  status?: 'ok' | 'skipped';
  warnings?: string[];
  /** Items that failed while the rest of the step went on: the step counts as failed. */
  failures?: string[];
  /** Machine-readable details for --json. */
  data?: Record<string, unknown>;
}

export interface Step {
  name: string;
  /** What it moves and where: `~/data/outputs/ → r2://comfy-multi-user-files/outputs/`. */
  moves: string;
  /** Set when this mode leaves the step out (`--quick`): listed, not run. */
  skipReason?: string;
  run(ctx: StepContext): Promise<StepResult>;
}

export type StepStatus = 'ok' | 'skipped' | 'failed' | 'interrupted';

export interface StepReport {
  step: number;
  name: string;
  moves: string;
  status: StepStatus;
  summary?: string;
  error?: string;
  bytes?: number;
  warnings: string[];
  failures: string[];
  ms: number;
  data?: Record<string, unknown>;
}

/** Runs every step in order; a failed step does not stop the others, an interrupt does. */
export async function runPlan(steps: Step[], base: Omit<StepContext, 'earlier' | 'steps'>): Promise<StepReport[]> {
  const reports: StepReport[] = [];
  const ctx: StepContext = { ...base, earlier: reports, steps };
  for (const [i, step] of steps.entries()) {
    const n = i + 1;
    const report: StepReport = { step: n, name: step.name, moves: step.moves, status: 'ok', warnings: [], failures: [], ms: 0 };
    reports.push(report);
    ctx.out.step(n, step.name);
    ctx.out.detail(step.moves);
    if (ctx.signal.aborted) {
      report.status = 'interrupted';
      continue;
    }
    if (step.skipReason) {
      report.status = 'skipped';
      report.summary = `skipped (${step.skipReason})`;
      ctx.out.info(`– ${report.summary}`);
      continue;
    }
    const started = Date.now();
    try {
      const r = await step.run(ctx);
      Object.assign(report, {
        summary: r.summary,
        bytes: r.bytes,
        data: r.data,
        warnings: r.warnings ?? [],
        failures: r.failures ?? [],
      });
      report.status = r.failures?.length ? 'failed' : (r.status ?? 'ok');
      for (const w of report.warnings) ctx.out.warn(w);
      for (const f of report.failures) ctx.out.fail(f);
      if (report.status === 'failed') ctx.out.fail(r.summary);
      else if (report.status === 'skipped') ctx.out.info(`– ${r.summary}`);
      else ctx.out.ok(r.summary);
    } catch (e) {
      report.status = ctx.signal.aborted ? 'interrupted' : 'failed';
      report.error = ctx.signal.aborted ? `interrupted (${ctx.signal.reason?.message ?? 'signal'})` : errorText(e);
      ctx.out.fail(report.error);
      // A stack only for a bug (a TypeError and its kin), never for a failure the step expects,
      // and only with --verbose.
      if (ctx.verbose && !ctx.signal.aborted && isBug(e) && e.stack) ctx.out.detail(e.stack);
    }
    report.ms = Date.now() - started;
  }
  return reports;
}

/** Errors that only a bug in these scripts raises: worth a stack trace (with --verbose). */
function isBug(e: unknown): e is Error {
  return e instanceof TypeError || e instanceof ReferenceError || e instanceof RangeError || e instanceof SyntaxError;
}

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
  extraFlags?: { boolean?: string[]; string?: string[] };
  /**
   * Builds the plan (for --verify too: its steps then check instead of send); throws UsageError
   * for a configuration the plan cannot run with.
   */
  plan: (cfg: Config, flags: Flags) => Plan;
}

export interface Plan {
  steps: Step[];
  /** Directories the run writes into: temporary files a killed run left there are removed first. */
  workDirs?: string[];
  /** Runs after the steps whatever happened (closes the SSH connection). */
  close?: () => Promise<void>;
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

/** The whole life of a script run. Never returns; exits with the SPEC's codes. */
export async function runScript(def: ScriptDef, argv = scriptArgs()): Promise<never> {
  let flags: Flags;
  let cfg: Config;
  let plan: Plan;
  try {
    flags = parseFlags(argv, def.extraFlags);
    if (flags.help) {
      process.stdout.write(`${def.usage}\n\n${COMMON_HELP}\n`);
      return exitAfterOutput(EXIT.ok);
    }
    cfg = loadConfig(process.env, scriptDir(), flags.envFile);
    plan = def.plan(cfg, flags);
  } catch (e) {
    // A usage or configuration error is exit 2; anything else here is a bug, said without a stack.
    process.stderr.write(`${def.name}: ${e instanceof UsageError ? '' : 'internal error: '}${errorText(e)}\n`);
    return exitAfterOutput(e instanceof UsageError ? EXIT.usage : EXIT.failed);
  }

  const out = new Output(flags.json, flags.verbose);
  let release: () => void;
  try {
    release = acquireLock(path.join(cfg.stateDir, `${def.name}.lock`), def.name);
  } catch (e) {
    if (e instanceof LockHeld) {
      process.stderr.write(`${def.name}: ${e.message}; not starting\n`);
      return exitAfterOutput(EXIT.locked);
    }
    const why = e instanceof LockError ? e.message : errorText(e);
    process.stderr.write(`${def.name}: COMFYMULTI_STATE_DIR (${cfg.stateDir}): ${why}; nothing was done\n`);
    return exitAfterOutput(EXIT.usage);
  }
  // What a killed run (SIGKILL, power loss) left half-written: its writer is gone.
  for (const dir of [cfg.stateDir, ...(plan.workDirs ?? [])]) removeStalePartials(dir);

  // First SIGINT/SIGTERM: stop and clean up (partial files removed, multipart uploads aborted).
  // A second one: leave at once.
  const controller = new AbortController();
  // Every request in flight listens on it: many more than Node's default warning threshold.
  setMaxListeners(0, controller.signal);
  const onSignal = (sig: NodeJS.Signals) => {
    if (controller.signal.aborted) {
      // Leave now, whatever is in progress: process.exit() itself waits for a blocked file
      // system call, SIGKILL does not.
      release();
      process.stderr.write(`${def.name}: second ${sig}: leaving at once\n`);
      process.kill(process.pid, 'SIGKILL');
    }
    out.clearProgress();
    process.stderr.write(`\n${def.name}: ${sig} received, stopping and cleaning up\n`);
    controller.abort(new Error(sig));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);

  const started = Date.now();
  out.header(def.title(flags));
  let reports: StepReport[];
  try {
    reports = await runPlan(plan.steps, { out, dryRun: flags.dryRun, verbose: flags.verbose, signal: controller.signal });
  } finally {
    await plan.close?.().catch(() => {});
    release();
  }

  const failed = reports.filter((r) => r.status === 'failed' || r.status === 'interrupted');
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  const code = failed.length ? EXIT.failed : EXIT.ok;
  out.plain('');
  const counts = [
    `${reports.filter((r) => r.status === 'ok').length} ok`,
    `${reports.filter((r) => r.status === 'skipped').length} skipped`,
    `${failed.length} failed`,
  ];
  const what = flags.dryRun ? 'Dry run' : flags.verify ? 'Verify' : (def.outcome?.(flags) ?? 'Backup');
  out.header(`=== ${what} ${failed.length ? 'FAILED' : 'complete'} in ${seconds}s: ${counts.join(', ')} ===`);
  // The summary names the failures themselves, not only their steps: a cron log is read from its end.
  for (const r of failed) {
    const items = r.failures.slice(0, 5).concat(r.failures.length > 5 ? [`and ${r.failures.length - 5} more`] : []);
    const why = r.error ?? (items.length ? items.join('; ') : (r.summary ?? r.status));
    out.fail(`Step ${r.step} (${r.name}): ${why}`);
  }
  if (controller.signal.aborted) out.fail(`interrupted by ${controller.signal.reason?.message}`);
  for (const notice of notices) out.warn(notice);
  const total = reports.reduce((n, r) => n + (r.bytes ?? 0), 0);
  const moved = flags.dryRun ? 'would send' : (def.moved?.(flags) ?? 'sent');
  if (total && !flags.verify) out.info(`${moved} ${humanSize(total)} in all`);

  if (flags.json) {
    const summary = {
      script: def.name,
      mode: flags.quick ? 'quick' : 'full',
      dryRun: flags.dryRun,
      verify: flags.verify,
      ok: code === EXIT.ok,
      exitCode: code,
      interrupted: controller.signal.aborted || undefined,
      startedAt: new Date(started).toISOString(),
      durationMs: Date.now() - started,
      steps: reports,
      notices: [...notices],
    };
    process.stdout.write(JSON.stringify(summary, null, 2) + '\n');
  }
  return exitAfterOutput(code);
}
