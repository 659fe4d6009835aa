// Models go from Verda to R2 directly, never through Mello: Mello runs the installed
// backup-verda.mts on Verda with `--models-here` over the run's SSH connection, and hands it
// the R2 target and credentials on stdin (never on a command line). Verda syncs its
// `*.safetensors` with the hash cache on SFS, so a new instance does not hash 45 GB again.
import path from 'node:path';
import { addNotice, answerRequest, humanSize } from './cli.ts';
import { DEFAULT_LIMITS, type BucketTarget, type Limits } from './config.ts';
import type { RunRecord } from './manifest.ts';
import type { Step } from './plan.ts';
import { R2Backend, r2Limits } from './r2.ts';
import type { Host } from './ssh.ts';
import { printable, syncTree, type SyncResult } from './sync.ts';

export const MODELS_FLAG = '--models-here';

/** What Mello sends on stdin: one JSON line. */
export interface ModelsRequest {
  target: BucketTarget;
  modelsDir: string;
  /** The models' hash cache on SFS, so a new instance does not hash 45 GB again. */
  hashCacheFile: string;
  /** Its older whole-file form, read the first time only. */
  legacyHashCacheFile?: string;
  dryRun: boolean;
  /** Mello's R2 timeout, attempts and backoff, so Verda's requests end as Mello's do. */
  limits: Pick<Limits, 'r2IdleTimeoutMs' | 'r2Attempts' | 'r2BackoffMs'>;
}

export const isModel = (rel: string) => rel.endsWith('.safetensors');

/** The Mello side: one step that drives Verda and reports its result. */
export function modelsStep(opts: {
  host: Host;
  scriptsDir: string;
  /** Undefined only when the step is skipped (--quick needs no models bucket). */
  target: BucketTarget | undefined;
  modelsDir: string;
  sfsBackupDir: string;
  limits: Limits;
  skipReason?: string;
  /** The run's record: every model sent or found unchanged goes into the manifest. */
  run: RunRecord;
}): Step {
  const bucket = opts.target?.bucket ?? 'models bucket';
  return {
    name: 'Models to R2 (sent from Verda)',
    moves: `${opts.host.label}:${opts.modelsDir}/**/*.safetensors → r2://${bucket}/`,
    skipReason: opts.skipReason,
    async run(ctx) {
      if (!opts.target) throw new Error('no models bucket configured');
      const request: ModelsRequest = {
        target: opts.target,
        modelsDir: opts.modelsDir,
        hashCacheFile: path.join(opts.sfsBackupDir, '.hash-cache', 'models.jsonl'),
        legacyHashCacheFile: path.join(opts.sfsBackupDir, '.hash-cache', 'models.json'),
        dryRun: ctx.dryRun,
        limits: opts.limits,
      };
      // The request (with the models bucket's credentials) goes on stdin, never on a command line.
      const r = await opts.host.$({
        input: JSON.stringify(request) + '\n',
        holdStdin: true,
        signal: ctx.signal,
        onStderr: (text) =>
          text
            .split('\n')
            .filter(Boolean)
            .forEach((line) => ctx.out.detail(`verda: ${line}`)),
      })`${path.join(opts.scriptsDir, 'backup-verda.mts')} ${MODELS_FLAG}`;
      const last = r.stdout.trim().split('\n').pop() ?? '';
      let result: (SyncResult & { error?: string; notices?: string[] }) | undefined;
      try {
        result = JSON.parse(last);
      } catch {
        /* not our output: the command failed to start */
      }
      if (!result) {
        const said = r.stderr.trim().split('\n').slice(-2).join('; ');
        throw new Error(
          `backup-verda.mts ${MODELS_FLAG} on ${opts.host.label} failed (exit ${r.code}): ${said || 'no output'}`,
        );
      }
      for (const notice of result.notices ?? []) addNotice(`on ${opts.host.label}: ${notice}`);
      if (result.error) throw new Error(`on ${opts.host.label}: ${result.error}`);
      const warnings = [
        ...(result.vanished ?? []).map((k) => `${printable(k)} vanished on Verda before it was sent: not backed up`),
        ...(result.cacheWarning ? [`on Verda: ${result.cacheWarning}`] : []),
      ];
      for (const a of result.actions) {
        if (a.action === 'send' && ctx.dryRun)
          ctx.out.info(`would send r2://${bucket}/${printable(a.key)} (${humanSize(a.bytes)})`);
        if (a.action !== 'failed' && !ctx.dryRun) {
          opts.run.object({
            bucket,
            key: a.key,
            bytes: a.bytes,
            sha256: a.sha256,
            action: a.action === 'send' ? 'uploaded' : 'skipped',
          });
        }
      }
      return {
        summary: `${result.files} models (${humanSize(result.bytes)}): ${result.sent} ${ctx.dryRun ? 'to send' : 'sent'} (${humanSize(result.sentBytes)}), ${result.skipped} unchanged${result.adopted ? `, ${result.adopted} adopted from earlier uploads` : ''}`,
        bytes: result.sentBytes,
        warnings,
        failures: result.failures.map((f) => `${printable(f.key)}: ${f.error}`),
        data: { ...result, bucket },
      };
    },
  };
}

/**
 * The Verda side of `--models-here`: reads the request line, syncs, prints the result as one
 * JSON line. Stops (aborting uploads in flight) when stdin closes: Mello is gone.
 */
export async function runModelsHere(): Promise<never> {
  let decided = 0;
  return answerRequest<ModelsRequest, SyncResult>(
    (request, signal) =>
      syncTree({
        root: request.modelsDir,
        // A request from an older Mello carries no limits.
        backend: new R2Backend(request.target, r2Limits(request.limits ?? DEFAULT_LIMITS)),
        prefix: '',
        cacheFile: request.hashCacheFile,
        legacyCache: request.legacyHashCacheFile,
        // Every model goes into Mello's manifest.
        keepActions: Infinity,
        filter: isModel,
        dryRun: request.dryRun,
        signal,
        onFile: (a) => {
          decided++;
          process.stderr.write(`${a.action} ${printable(a.key)}\n`);
        },
      }),
    () => `${decided} models done so far`,
  );
}
