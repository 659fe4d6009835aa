// Models go from Verda to R2 directly, never through Mello: Mello calls Verda over the run's SSH
// connection (lib/remote.ts: the code goes with the call) and hands it the models bucket's target
// and credentials on stdin (never on a command line). Verda syncs its `*.safetensors` with the
// hash cache on SFS, so a new instance does not hash 45 GB again, and reports its progress.
import path from 'node:path';
import { addNotice, humanSize, printable } from './cli.ts';
import type { BucketTarget, Limits } from './config.ts';
import type { RunRecord } from './manifest.ts';
import type { Step } from './step.ts';
import { R2Backend, r2Limits } from './r2.ts';
import { callVerda, type Report } from './remote.ts';
import { requireSfs } from './sfs.ts';
import type { Host } from './ssh.ts';
import { syncTree, type FileAction, type SyncResult } from './sync.ts';

/** What Mello sends on stdin: one JSON line. */
export interface ModelsRequest {
  target: BucketTarget;
  modelsDir: string;
  /** The models' hash cache on SFS, so a new instance does not hash 45 GB again. */
  hashCacheFile: string;
  dryRun: boolean;
  /** Mello's R2 timeout, attempts and backoff, so Verda's requests end as Mello's do. */
  limits: Pick<Limits, 'r2IdleTimeoutMs' | 'r2Attempts' | 'r2BackoffMs'>;
}

const isModel = (rel: string) => rel.endsWith('.safetensors');

/** The Mello side: one step that drives Verda and reports its result. */
export function modelsStep(opts: {
  host: Host;
  /** Undefined only when the step is skipped (--quick needs no models bucket). */
  target: BucketTarget | undefined;
  modelsDir: string;
  sfsBackupDir: string;
  limits: Limits;
  skipReason?: string;
  /** The run's record: every model sent or found unchanged goes into the manifest. */
  record: RunRecord;
  /** SFS_MOUNT: the models and their hash cache live on SFS (lib/sfs.ts). */
  sfsMount?: string;
}): Step {
  const bucket = opts.target?.bucket ?? 'models bucket';
  return {
    name: 'Models to R2 (sent from Verda)',
    moves: `${opts.host.label}:${opts.modelsDir}/**/*.safetensors → r2://${bucket}/`,
    skipReason: opts.skipReason,
    async run(ctx) {
      if (!opts.target) throw new Error('no models bucket configured');
      await requireSfs(opts.host, opts.sfsMount, opts.modelsDir, 'backing up the models of', ctx.signal);
      await requireSfs(opts.host, opts.sfsMount, opts.sfsBackupDir, 'keeping the models hash cache in', ctx.signal);
      const request: ModelsRequest = {
        target: opts.target,
        modelsDir: opts.modelsDir,
        hashCacheFile: path.join(opts.sfsBackupDir, '.hash-cache', 'models.jsonl'),
        dryRun: ctx.dryRun,
        limits: opts.limits,
      };
      const progress = ctx.out.transfer('models sent from Verda');
      const answer = await callVerda(opts.host, 'backup-models', request, {
        signal: ctx.signal,
        onProgress: (p) => progress.update(p),
        onLine: (line) => ctx.out.detail(`verda: ${line}`),
      }).finally(() => progress.end());
      const result = answer as Partial<SyncResult> & { error?: unknown; notices?: unknown };
      // What Verda answers is data: a few notices, each one line and bounded.
      const notices = Array.isArray(result.notices) ? result.notices.slice(0, 20) : [];
      for (const notice of notices) addNotice(`on ${opts.host.label}: ${String(notice).slice(0, 500)}`);
      if (result.error !== undefined) throw new Error(`on ${opts.host.label}: ${String(result.error).slice(0, 500)}`);
      const problem = answerProblem(result);
      if (problem) throw new Error(`${opts.host.label}'s answer cannot be trusted: ${problem}; no model is recorded`);
      const models = result as SyncResult;
      const warnings = [
        ...models.vanished.map((k) => `${printable(k)} vanished on Verda before it was sent: not backed up`),
        ...(models.cacheWarning ? [`on Verda: ${String(models.cacheWarning).slice(0, 500)}`] : []),
      ];
      for (const a of models.actions) {
        if (a.action === 'send' && ctx.dryRun)
          ctx.out.info(`would send r2://${bucket}/${printable(a.key)} (${humanSize(a.bytes)})`);
        if (a.action !== 'failed' && !ctx.dryRun) {
          opts.record.object({
            bucket,
            key: a.key,
            bytes: a.bytes,
            sha256: a.sha256,
            action: a.action === 'send' ? 'uploaded' : 'skipped',
          });
        }
      }
      return {
        summary: `${models.files} models (${humanSize(models.bytes)}): ${models.sent} ${ctx.dryRun ? 'to send' : 'sent'} (${humanSize(models.sentBytes)}), ${models.skipped} unchanged${models.adopted ? `, ${models.adopted} adopted from earlier uploads` : ''}`,
        bytes: models.sentBytes,
        warnings,
        failures: models.failures.map((f) =>
          // The root itself: name the variable, not `.`.
          f.key === '.'
            ? `VERDA_MODELS_DIR ${opts.modelsDir} on ${opts.host.label}: ${printable(String(f.error).slice(0, 500))}`
            : `${printable(f.key)}: ${printable(String(f.error).slice(0, 500))}`,
        ),
        data: { ...models, bucket },
      };
    },
  };
}

const count = (n: unknown) => typeof n === 'number' && Number.isSafeInteger(n) && n >= 0;
const SHA256 = /^[0-9a-f]{64}$/;

/**
 * What is wrong with Verda's answer to the models request, or undefined: every model it records
 * as sent or found in R2 has a key under the models directory, a size and a sha256 (the manifest
 * records what a restore will check: a record without them would be a model no one can verify).
 */
export function answerProblem(r: Partial<SyncResult>): string | undefined {
  for (const n of ['files', 'bytes', 'sent', 'sentBytes', 'skipped', 'adopted', 'failureCount'] as const)
    if (!count(r[n] ?? 0)) return `its ${n} is not a count`;
  if (!Array.isArray(r.actions) || !Array.isArray(r.failures) || !Array.isArray(r.vanished ?? []))
    return 'it lists no actions';
  for (const a of r.actions as Partial<FileAction & { sha256: unknown }>[]) {
    const key = typeof a?.key === 'string' ? a.key : undefined;
    const named = key === undefined ? 'a model without a key' : printable(key.slice(0, 200));
    // A failed action may name a directory that could not be read (`.`: the models directory).
    const outside = key === undefined || key.startsWith('/') || key.split('/').includes('..');
    if (outside || (a.action !== 'failed' && !isModel(key))) return `${named}: not a model under the models directory`;
    if (a.action !== 'send' && a.action !== 'skip' && a.action !== 'failed') return `${named}: an unknown action`;
    if (!count(a.bytes)) return `${named} is recorded without a size`;
    if (a.action !== 'failed' && !(typeof a.sha256 === 'string' && SHA256.test(a.sha256)))
      return `${named} is recorded as ${a.action === 'send' ? 'sent' : 'in R2'} without a sha256`;
  }
  if (!r.failures.every((f) => typeof f?.key === 'string')) return 'a failure without a key';
  if (!(r.vanished ?? []).every((k) => typeof k === 'string')) return 'a vanished model without a key';
  const counted = (r.sent ?? 0) + (r.skipped ?? 0) + (r.failureCount ?? r.failures.length);
  if (r.actions.length !== counted) return `it records ${r.actions.length} models, not the ${counted} it counts`;
  return undefined;
}

/** Verda's side of `backup-models` (lib/verda.ts): the sync, its progress reported as it goes. */
export function backupModelsOnVerda(request: ModelsRequest, signal: AbortSignal, report: Report): Promise<SyncResult> {
  return syncTree({
    root: request.modelsDir,
    backend: new R2Backend(request.target, r2Limits(request.limits)),
    prefix: '',
    cacheFile: request.hashCacheFile,
    // Every model goes into Mello's manifest, and its mode with it into R2.
    keepActions: Infinity,
    recordModes: true,
    filter: isModel,
    dryRun: request.dryRun,
    signal,
    onProgress: (bytes, total, file, counting) => report({ bytes, total, file, counting }),
    onFile: (a) => process.stderr.write(`${a.action} ${printable(a.key)}\n`),
  });
}
