// A step is a value: its name, what it moves, and how to run it. The printed step lines,
// --dry-run and --json all come from the same plan, run here in order. Every step factory of lib/
// builds on this file, and nothing here knows of scripts, locks or pings (lib/script.ts).
import { errorText, type Output } from './cli.ts';

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
  /** Runs even after an interrupt (the manifest: an interrupted run records what it did). */
  always?: boolean;
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
  /** Failed only because a host that an earlier step could not reach is still unreachable. */
  repeat?: boolean;
}

/** Runs every step in order; a failed step does not stop the others, an interrupt does. */
export async function runPlan(steps: Step[], base: Omit<StepContext, 'earlier' | 'steps'>): Promise<StepReport[]> {
  const reports: StepReport[] = [];
  const ctx: StepContext = { ...base, earlier: reports, steps };
  // A refusal that every step meets (no such bucket, a key refused) is said in full once: the
  // step that said it, by the words of its reason (lib/storage.ts StorageError.reason).
  const saidBy = new Map<string, number>();
  for (const [i, step] of steps.entries()) {
    const n = i + 1;
    const report: StepReport = {
      step: n,
      name: step.name,
      moves: step.moves,
      status: 'ok',
      warnings: [],
      failures: [],
      ms: 0,
    };
    reports.push(report);
    ctx.out.step(n, step.name);
    ctx.out.detail(step.moves);
    if (ctx.signal.aborted && !step.always) {
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
      const interrupted = ctx.signal.aborted && !step.always;
      report.status = interrupted ? 'interrupted' : 'failed';
      report.error = interrupted ? `interrupted (${ctx.signal.reason?.message ?? 'signal'})` : errorText(e);
      const reason = (e as { reason?: unknown })?.reason;
      if (!interrupted && typeof reason === 'string' && reason) {
        const said = saidBy.get(reason);
        if (said === undefined) saidBy.set(reason, n);
        else report.error = sameCause(report.error, reason, said);
      }
      // An error said before (a host unreachable: lib/ssh.ts HostError) is one line in the summary.
      if ((e as { repeat?: boolean })?.repeat === true) report.repeat = true;
      ctx.out.fail(report.error);
      // A stack only for a bug (a TypeError and its kin), never for a failure the step expects,
      // and only with --verbose.
      if (ctx.verbose && !ctx.signal.aborted && isBug(e) && e.stack)
        e.stack.split('\n').forEach((l) => ctx.out.detail(l));
    }
    report.ms = Date.now() - started;
  }
  return reports;
}

/** `r2://b/outputs/ list: <reason>` → `r2://b/outputs/ list: same cause as step 1`. */
function sameCause(error: string, reason: string, step: number): string {
  const same = `same cause as step ${step}`;
  return error.includes(reason) ? error.replace(reason, same) : `${same}: ${error}`;
}

/** Errors that only a bug in these scripts raises: worth a stack trace (with --verbose). */
function isBug(e: unknown): e is Error {
  return e instanceof TypeError || e instanceof ReferenceError || e instanceof RangeError || e instanceof SyntaxError;
}
