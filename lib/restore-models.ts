// Models back onto a restored Verda, downloaded by Verda itself from the models bucket (never
// through Mello). Mello brings restore-verda's bundle over the run's connection (a fresh Verda has
// no scripts installed), runs it with `--models-here` and hands it the models bucket's target and
// credentials on stdin, as the backup's models step does.
//
// Verda downloads every object that is missing or differs with the download engine
// (lib/download.ts: ranged GETs, sha256 as the bytes land, temporary name then rename). A file
// already there with the object's size and sha256 (by the hash cache on SFS, which the backup
// keeps too) is not downloaded. Nothing is ever deleted.
import fs from 'node:fs';
import path from 'node:path';
import { addNotice, answerRequest, humanSize, printable } from './cli.ts';
import { DEFAULT_LIMITS, type BucketTarget, type Limits } from './config.ts';
import { downloadTree, type DownloadAction, type DownloadTreeOptions, type DownloadTreeResult } from './download.ts';
import { TreeCache } from './hash-cache.ts';
import type { Step } from './step.ts';
import { R2Backend, r2Limits } from './r2.ts';
import type { RestoreSource } from './restore.ts';
import { requireSfs } from './sfs.ts';
import type { Host } from './ssh.ts';

export const MODELS_HERE_FLAG = '--models-here';

/** What Mello sends on stdin: one JSON line. */
export interface ModelsRestoreRequest {
  target: BucketTarget;
  modelsDir: string;
  hashCacheFile: string;
  dryRun: boolean;
  limits: Pick<Limits, 'r2IdleTimeoutMs' | 'r2Attempts' | 'r2BackoffMs'>;
}

/** What the models step decides for each model (the download engine's actions: lib/download.ts). */
export type ModelAction = DownloadAction;
export type RestoreTreeResult = DownloadTreeResult;
export type RestoreTreeOptions = DownloadTreeOptions;

/** Every object of the models bucket into the models directory, where missing or different. Never deletes. */
export const restoreTree = (options: RestoreTreeOptions): Promise<RestoreTreeResult> => downloadTree(options);

// ---------------------------------------------------------------------------------------------
// Mello's side

/** The directory the bundle is brought into on Verda: made by mktemp, removed by the bundle itself. */
const BROUGHT_DIR = /^comfymulti-restore\.[A-Za-z0-9]{8}$/;

// One command: Node.js 20 there (127: none, 126: too old, its version said), the bundle's $1
// bytes from stdin into a new private directory, then Node runs it, which reads the request that
// follows on the same stdin and removes the directory once loaded.
const BRING_AND_RUN = `command -v node >/dev/null 2>&1 || exit 127
v=$(node --version 2>/dev/null)
case $v in v[2-9][0-9].* | v[1-9][0-9][0-9].*) ;; *) printf 'node %s\\n' "$v" >&2; exit 126 ;; esac
umask 077
d=$(mktemp -d "\${TMPDIR:-/tmp}/comfymulti-restore.XXXXXXXX") || exit 1
head -c "$1" > "$d/restore-verda.mjs" || { rm -rf -- "$d"; exit 1; }
exec node "$d/restore-verda.mjs" ${MODELS_HERE_FLAG}`;

export interface ModelsRestoreStepOptions {
  host: Host;
  /** Undefined only when the step is skipped (no models bucket needed). */
  target: BucketTarget | undefined;
  modelsDir: string;
  hashCacheFile: string;
  limits: Limits;
  source: RestoreSource;
  /** restore-verda's bundle (one file): what Verda runs. */
  bundle: () => Promise<Buffer>;
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
      const code = await o.bundle();
      const request: ModelsRestoreRequest = {
        target: o.target,
        modelsDir: o.modelsDir,
        hashCacheFile: o.hashCacheFile,
        dryRun: ctx.dryRun,
        limits: o.limits,
      };
      // The bundle, then the request (with the models bucket's credentials) on stdin, never on a
      // command line; stdin then stays open: Verda stops when it closes (this side is gone).
      // stdin held open: Verda's side stops (and cleans up) when Mello is gone.
      const r = await o.host.run(['sh', '-c', BRING_AND_RUN, 'sh', String(code.length)], {
        input: Buffer.concat([code, Buffer.from(JSON.stringify(request) + '\n')]),
        holdStdin: true,
        signal: ctx.signal,
        onStderr: (line) => line && ctx.out.detail(`verda: ${line}`),
      });
      if (r.code === 126 || r.code === 127) {
        const found =
          r.code === 127 ? 'none on the PATH of a non-interactive SSH login' : r.stderr.trim().replace(/^node /, '');
        throw new Error(
          `Node.js 20 or newer is needed on ${o.host.label} to download the models (found: ${found}): ` +
            `install it there, then run restore-verda.mts --only models`,
        );
      }
      let result: (RestoreTreeResult & { error?: string; cacheWarning?: string; notices?: string[] }) | undefined;
      try {
        result = JSON.parse(r.stdout.trim().split('\n').pop() ?? '');
      } catch {
        /* not its output: it did not start */
      }
      if (!result) {
        // ssh's 255: the connection went (its stderr holds Verda's progress lines, not why).
        const lost = r.code === 255 && o.host.label !== 'local' ? 'the SSH connection was lost; ' : '';
        const said = lost + r.stderr.trim().split('\n').slice(-2).join('; ');
        throw new Error(
          `restore-verda ${MODELS_HERE_FLAG} on ${o.host.label} failed (exit ${r.code}): ${said || 'no output'}`,
        );
      }
      for (const notice of result.notices ?? []) addNotice(`on ${o.host.label}: ${notice}`);
      if (result.error) throw new Error(`on ${o.host.label}: ${result.error}`);
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

/**
 * `restore-verda.mjs --models-here` on Verda: reads the request line, restores the models,
 * prints the result as one JSON line. Stops (removing what it was writing) when stdin closes:
 * Mello is gone, or the link dropped.
 */
export async function runModelsRestoreHere(): Promise<never> {
  let done = 0;
  let bytes = 0;
  return answerRequest<ModelsRestoreRequest, RestoreTreeResult>(
    async (request, signal) => {
      // Brought by Mello into a directory of its own (see BRING_AND_RUN): loaded now, so removed.
      const brought = path.dirname(process.argv[1] ?? '');
      if (BROUGHT_DIR.test(path.basename(brought))) fs.rmSync(brought, { recursive: true, force: true });
      const limits = request.limits ?? DEFAULT_LIMITS;
      return restoreTree({
        root: request.modelsDir,
        backend: new R2Backend(request.target, r2Limits(limits)),
        cache: await TreeCache.open(request.hashCacheFile, { write: !request.dryRun, keepPassedOver: true }),
        dryRun: request.dryRun,
        // The modes recorded at backup (0644 when unknown), in 0755 directories.
        modes: true,
        signal,
        attempts: limits.r2Attempts,
        backoffMs: limits.r2BackoffMs,
        idleTimeoutMs: limits.r2IdleTimeoutMs,
        onBytes: (n) => (bytes += n),
        onFile: (a) => {
          done++;
          process.stderr.write(`${a.action} ${printable(a.key)}\n`);
        },
      });
    },
    () => `${done} models decided, ${humanSize(bytes)} downloaded`,
  );
}

// ---------------------------------------------------------------------------------------------
// The bundle Verda runs

/** The checkout (or installed copy) the running script is in: a bundle's is its parent's. */
function scriptRoot(): string {
  const dir = path.dirname(fs.realpathSync(process.argv[1] ?? '.'));
  return path.basename(dir) === 'dist' ? path.dirname(dir) : dir;
}

/** The newest mtime of the script and every file under lib/ (lib/launch.sh's rule for a stale bundle). */
function newestSource(root: string, script: string): number {
  let newest = fs.statSync(path.join(root, `${script}.mts`)).mtimeMs;
  const visit = (dir: string) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) visit(p);
      else newest = Math.max(newest, fs.statSync(p).mtimeMs);
    }
  };
  visit(path.join(root, 'lib'));
  return newest;
}

// CommonJS dependencies inside an ES module bundle still call require() for Node's builtins.
const BANNER =
  "import { createRequire as __createRequire } from 'node:module'; " +
  'const require = __createRequire(import.meta.url);';

/**
 * A script as one file Node 20 runs anywhere: `dist/single/NAME.mjs` (built without chunks) while
 * it is newer than every source, else bundled now, in memory, with build.mjs's settings (an
 * installed copy has no dist/).
 */
export async function scriptBundle(script: string): Promise<Buffer> {
  const root = scriptRoot();
  const built = path.join(root, 'dist', 'single', `${script}.mjs`);
  const st = fs.statSync(built, { throwIfNoEntry: false });
  if (st?.isFile() && st.mtimeMs > newestSource(root, script)) return fs.readFileSync(built);
  // esbuild cannot be bundled (its binary): it is external to the bundles, loaded here on Mello.
  const { build } = await import('esbuild');
  const r = await build({
    entryPoints: [path.join(root, `${script}.mts`)],
    bundle: true,
    write: false,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    external: ['esbuild'],
    banner: { js: BANNER },
    logLevel: 'silent',
  });
  return Buffer.from(r.outputFiles[0].contents);
}
