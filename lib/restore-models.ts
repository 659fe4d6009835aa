// Models back onto a restored Verda, downloaded by Verda itself from the models bucket (never
// through Mello). Mello calls Verda over the run's connection (lib/remote.ts: the code goes with
// the call, a fresh Verda has no scripts installed) and hands it the models bucket's target and
// credentials on stdin, as the backup's models step does.
//
// Verda downloads every object that is missing or differs with the download engine
// (lib/download.ts: ranged GETs, sha256 as the bytes land, temporary name then rename, the mode
// recorded at backup). A file already there with the object's size and sha256 (by the hash cache
// on SFS, which the backup keeps too) is not downloaded. Nothing is ever deleted.
import { addNotice, humanSize, printable } from './cli.ts';
import type { BucketTarget, Limits } from './config.ts';
import { downloadTree, type DownloadTreeOptions, type DownloadTreeResult } from './download.ts';
import { TreeCache } from './hash-cache.ts';
import type { Step } from './step.ts';
import { R2Backend, r2Limits } from './r2.ts';
import { callVerda, type Report } from './remote.ts';
import type { RestoreSource } from './restore.ts';
import { requireSfs } from './sfs.ts';
import type { Host } from './ssh.ts';

/** What Mello sends on stdin: one JSON line. */
export interface ModelsRestoreRequest {
  target: BucketTarget;
  modelsDir: string;
  hashCacheFile: string;
  dryRun: boolean;
  limits: Pick<Limits, 'r2IdleTimeoutMs' | 'r2Attempts' | 'r2BackoffMs'>;
}

/** What the models step decides for each model (the download engine's actions: lib/download.ts). */
export type RestoreTreeResult = DownloadTreeResult;
export type RestoreTreeOptions = DownloadTreeOptions;

/** Every object of the models bucket into the models directory, where missing or different. Never deletes. */
export const restoreTree = (options: RestoreTreeOptions): Promise<RestoreTreeResult> => downloadTree(options);

// ---------------------------------------------------------------------------------------------
// Mello's side

export interface ModelsRestoreStepOptions {
  host: Host;
  /** Undefined only when the step is skipped (no models bucket needed). */
  target: BucketTarget | undefined;
  modelsDir: string;
  hashCacheFile: string;
  limits: Limits;
  source: RestoreSource;
  /** SFS_MOUNT: the models live on SFS (lib/sfs.ts). */
  sfsMount?: string;
  skipReason?: string;
}

export function modelsRestoreStep(o: ModelsRestoreStepOptions): Step {
  const bucket = o.target?.bucket ?? 'models bucket';
  return {
    name: 'Models (downloaded by Verda)',
    moves: `r2://${bucket}/ → ${o.host.label}:${o.modelsDir}/ (what is missing or differs)`,
    skipReason: o.skipReason,
    async run(ctx) {
      if (!o.source.checked)
        return { status: 'skipped', summary: 'not restored: the backup did not check out (step 1)' };
      if (!o.target) throw new Error('no models bucket configured');
      await requireSfs(o.host, o.sfsMount, o.modelsDir, 'restoring the models into', ctx.signal);
      await requireSfs(o.host, o.sfsMount, o.hashCacheFile, 'keeping the models hash cache in', ctx.signal);
      const request: ModelsRestoreRequest = {
        target: o.target,
        modelsDir: o.modelsDir,
        hashCacheFile: o.hashCacheFile,
        dryRun: ctx.dryRun,
        limits: o.limits,
      };
      const progress = ctx.out.transfer('models downloaded by Verda');
      const answer = await callVerda(o.host, 'restore-models', request, {
        signal: ctx.signal,
        onProgress: (p) => progress.update(p),
        onLine: (line) => ctx.out.detail(`verda: ${line}`),
      }).finally(() => progress.end());
      // What Verda answers is data: a few notices, each one line and bounded; a result of the shape asked.
      const result = answer as unknown as RestoreTreeResult & { error?: unknown; notices?: unknown };
      const notices = Array.isArray(result.notices) ? result.notices.slice(0, 20) : [];
      if (result.error !== undefined) throw new Error(`on ${o.host.label}: ${String(result.error).slice(0, 500)}`);
      if (!Array.isArray(result.actions) || !Array.isArray(result.failures))
        throw new Error(`${o.host.label}'s answer is not a restore's result`);
      for (const notice of notices) addNotice(`on ${o.host.label}: ${String(notice).slice(0, 500)}`);
      for (const a of result.actions) {
        if (a.action === 'download' && ctx.dryRun)
          ctx.out.info(`would download ${printable(a.key)} (${humanSize(a.bytes)}, ${a.reason})`);
        else if (a.action === 'download')
          ctx.out.detail(`downloaded ${printable(a.key)} (${humanSize(a.bytes)}, ${a.reason})`);
        else if (a.action === 'in-place') ctx.out.detail(`in place ${printable(a.key)} (${a.how})`);
      }
      // Every model the backup records must be in the bucket: one gone is a model not restored.
      const inBucket = new Set(result.actions.map((a) => a.key));
      const gone = [...o.source.models]
        .filter(([key]) => !inBucket.has(key))
        .map(
          ([key, m]) =>
            `${printable(key)} (recorded by manifest-${m.recordedIn}.json) is not in r2://${bucket}: not restored`,
        );
      const verb = ctx.dryRun ? 'to download' : 'downloaded';
      return {
        summary:
          `${result.objects} models (${humanSize(result.bytes)}): ` +
          `${result.downloaded} ${verb} (${humanSize(result.downloadedBytes)}), ${result.inPlace} already in place`,
        bytes: ctx.dryRun ? 0 : result.downloadedBytes,
        warnings: result.cacheWarning ? [`on ${o.host.label}: ${result.cacheWarning}`] : [],
        failures: [...result.failures.map((f) => `${printable(f.key)}: ${f.error}`), ...gone],
        data: { ...result, bucket },
      };
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Verda's side

/** Verda's side of `restore-models` (lib/verda.ts): the download, its progress reported as it goes. */
export async function restoreModelsOnVerda(
  request: ModelsRestoreRequest,
  signal: AbortSignal,
  report: Report,
): Promise<RestoreTreeResult> {
  let done = 0;
  return restoreTree({
    root: request.modelsDir,
    backend: new R2Backend(request.target, r2Limits(request.limits)),
    cache: await TreeCache.open(request.hashCacheFile, { write: !request.dryRun, keepPassedOver: true }),
    dryRun: request.dryRun,
    // The modes recorded at backup (0644 when unknown), in 0755 directories.
    modes: true,
    signal,
    attempts: request.limits.r2Attempts,
    backoffMs: request.limits.r2BackoffMs,
    idleTimeoutMs: request.limits.r2IdleTimeoutMs,
    onBytes: (n, toDownload, file, counting) => report({ bytes: (done += n), total: toDownload, file, counting }),
    onFile: (a) => process.stderr.write(`${a.action} ${printable(a.key)}\n`),
  });
}
