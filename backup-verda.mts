#!/bin/sh
':' //; exec "$(dirname "$(readlink -f "$0")")/lib/launch.sh" "$0" "$@"
// (The two lines above are read by sh and ignored by Node: lib/launch.sh starts Node with this
// script, found beside it whatever the working directory. See README "How the scripts run".)

// backup-verda: run on Mello before Verda is shut down. Verda's identity and config to
// BACKUP_DIR on Mello and to the R2 cache bucket; in a full run also the worker image, and the
// models straight from Verda to the R2 models bucket. One SSH connection for the whole run.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { archiveStep, bundleFiles, commandToGzipFile, configArchives, type Artifact } from './lib/archive.ts';
import { humanSize } from './lib/cli.ts';
import { bucketTarget, requireDirOrAbsent } from './lib/config.ts';
import { ensurePrivateDir, isRegularFile, readRegularFileSync, writeFileAtomic } from './lib/files.ts';
import { HashCache } from './lib/hash-cache.ts';
import { verifyArtifactsStep, verifyObjectsStep, type Manifest, type R2Record } from './lib/manifest.ts';
import { MODELS_FLAG, modelsStep, runModelsHere } from './lib/models.ts';
import { runScript, type Step } from './lib/plan.ts';
import { R2Backend, r2Limits } from './lib/r2.ts';
import { copyWarnings, rotateLocal, rotateRemote, rotationStep, timestamp } from './lib/rotation.ts';
import { CommandTimeout, lazyHost } from './lib/ssh.ts';
import { fingerprintedSource, type Backend } from './lib/storage.ts';
import { saveCache } from './lib/sync.ts';

// Verda's side of the models step (see lib/models.ts): not a flag for people.
if (process.argv.includes(MODELS_FLAG)) await runModelsHere();

const IMAGE_FILE = 'worker-image.tar.gz';
const IMAGE_ID_FILE = 'worker-image.id';
const IMAGE_SHA_FILE = 'worker-image.sha256';
const BUNDLE_KEY = 'verda-config-backup.tar.gz';
const BUNDLE_PREFIX = 'verda-config-backups/';

await runScript({
  name: 'backup-verda',
  title: (f) => `=== Verda → Mello and R2 (${f.quick ? 'quick: config only' : 'full'}) ===`,
  usage: `Usage: backup-verda.mts [--full | --quick] [--dry-run] [--json] [-v] [--env-file PATH]

Run on Mello before Verda is shut down. Archives Verda's identity and config (tailscale, SSH host
keys, fail2ban, ufw, .env, home, project, oh-my-zsh) into BACKUP_DIR as KIND-YYYYMMDD-HHMMSS.tar.gz
and sends a bundle of them to the R2 cache bucket. A full run (the default) also saves the worker
image when its ID changed and sends every *.safetensors under VERDA_MODELS_DIR from Verda straight
to the R2 models bucket. --quick: config only. Keeps KEEP_BACKUPS dated copies of each kind.`,
  plan(cfg, flags) {
    requireDirOrAbsent(cfg, 'BACKUP_DIR');
    requireDirOrAbsent(cfg, 'COMFYMULTI_STATE_DIR');
    const full = !flags.quick;
    const quickOnly = full ? undefined : '--quick';
    const cacheBucket = bucketTarget(cfg, 'cache');
    const modelsBucket = full ? bucketTarget(cfg, 'models') : undefined;
    const cache = new R2Backend(cacheBucket, r2Limits(cfg.limits));
    const dir = cfg.backupDir;
    if (flags.verify) {
      // From the newest manifest alone: no SSH, so it works once Verda is gone.
      const models = new R2Backend(bucketTarget(cfg, 'models'), r2Limits(cfg.limits));
      const backends = new Map<string, Backend>([
        [cache.target.bucket, cache],
        [models.target.bucket, models],
      ]);
      return { steps: [verifyArtifactsStep(dir), verifyObjectsStep(dir, backends, flags.deep)] };
    }
    const verda = lazyHost(cfg.verdaHost, { configFile: cfg.sshConfig, sudo: cfg.verdaSudo, limits: cfg.limits });
    const stamp = timestamp();
    const artifacts: Artifact[] = [];
    const r2: R2Record[] = [];
    let imageId: string | undefined;
    const record = (a: Artifact) => artifacts.push(a);
    const archives = configArchives(cfg);

    const tailscaleIp: Step = {
      name: 'Tailscale IP',
      moves: `${verda.label}: tailscale ip -4 → ${dir}/tailscale-ip.txt`,
      async run(ctx) {
        // No tailscale on Verda, or one that fails or hangs, is "unknown"; no Verda at all is a
        // failure (the run throws).
        let said = '';
        const r = await verda
          .run(['sh', '-c', 'command -v tailscale >/dev/null && tailscale ip -4'], { signal: ctx.signal })
          .catch((e) => {
            if (!(e instanceof CommandTimeout)) throw e;
            said = e.message;
            return { code: 1, stdout: '', stderr: '' };
          });
        const ip = (r.code === 0 && r.stdout.trim().split('\n')[0]) || 'unknown';
        if (ctx.dryRun) return { summary: `would write tailscale-ip.txt (${ip})` };
        ensurePrivateDir(dir);
        writeFileAtomic(path.join(dir, 'tailscale-ip.txt'), `${ip}\n`, 0o600);
        record({ name: 'tailscale-ip.txt', bytes: ip.length + 1, sha256: sha256Text(`${ip}\n`) });
        return { summary: `tailscale-ip.txt: ${ip}`, warnings: ip === 'unknown' ? [`tailscale ip -4 failed on Verda${said ? ` (${said})` : ''}: wrote "unknown"`] : [] };
      },
    };

    const image: Step = {
      name: 'Container image',
      moves: `${verda.label}: ${cfg.containerCli} save ${cfg.containerImage} → ${dir}/${IMAGE_FILE} → ${cache.name}/${IMAGE_FILE}`,
      skipReason: quickOnly,
      async run(ctx) {
        const cli = cfg.containerCli;
        const inspect = await verda.run([cli, 'image', 'inspect', '--format', '{{.Id}}', cfg.containerImage], { signal: ctx.signal });
        if (inspect.code !== 0) {
          throw new Error(`${cli} image inspect ${cfg.containerImage} on ${verda.label}: ${inspect.stderr.trim() || `exit ${inspect.code}`}`);
        }
        imageId = inspect.stdout.trim();
        const short = imageId.replace(/^sha256:/, '').slice(0, 12);
        const file = path.join(dir, IMAGE_FILE);
        const idFile = path.join(dir, IMAGE_ID_FILE);
        const recorded = readImageRecord(idFile, path.join(dir, IMAGE_SHA_FILE));
        const there = await cache.head(IMAGE_FILE, ctx.signal);
        const warnings: string[] = [];
        // Unchanged only when all three agree: the recorded ID is this image's, R2's object
        // carries it with the recorded bytes, and Mello's copy still holds them (its sha256 from
        // the hash cache, so an unchanged file is not read again). A file that merely exists is
        // not proof: a bad save once stood there.
        if (recorded?.imageId === imageId && there?.metadata['image-id'] === imageId && there.metadata.sha256 === recorded.sha256) {
          const local = await sha256Of(file, ctx.signal);
          if (local?.sha256 === recorded.sha256 && local.bytes === there.size) {
            artifacts.push({ name: IMAGE_FILE, bytes: local.bytes, sha256: local.sha256 });
            r2.push({ bucket: cacheBucket.bucket, key: IMAGE_FILE, bytes: there.size, sha256: local.sha256, action: 'skipped' });
            return { summary: `image ${short} unchanged since the last backup: not saved again` };
          }
          warnings.push(`${file} no longer holds the image recorded in ${IMAGE_SHA_FILE}: saved again`);
        }
        if (ctx.dryRun) return { summary: `would save image ${short} to ${file} and send it to ${cache.name}/${IMAGE_FILE}`, warnings };
        ensurePrivateDir(dir);
        // gzip level 1: the image is gigabytes and Mello is a small VPS; speed over a few % of size.
        const saved = await commandToGzipFile(verda, [cli, 'save', cfg.containerImage], file, { signal: ctx.signal, level: 1, expectTar: true });
        artifacts.push({ name: IMAGE_FILE, bytes: saved.bytes, sha256: saved.sha256 });
        const started = Date.now();
        let sent = 0;
        await cache.put(IMAGE_FILE, fingerprintedSource(file, saved.fingerprint), {
          metadata: { sha256: saved.sha256, 'image-id': imageId },
          signal: ctx.signal,
          onBytes: ctx.out.fancy ? (n) => ctx.out.progress(IMAGE_FILE, (sent += n), saved.bytes, started) : undefined,
        });
        r2.push({ bucket: cacheBucket.bucket, key: IMAGE_FILE, bytes: saved.bytes, sha256: saved.sha256, action: 'uploaded' });
        // Recorded only once both copies are complete: the ID last.
        writeFileAtomic(path.join(dir, IMAGE_SHA_FILE), `${saved.sha256}  ${IMAGE_FILE}\n`, 0o600);
        writeFileAtomic(idFile, `${imageId}\n`, 0o600);
        return { summary: `${IMAGE_FILE}: image ${short} (${humanSize(saved.bytes)}), saved and sent`, bytes: saved.bytes, warnings };
      },
    };

    /** sha256 of a file on Mello, by the hash cache (read again only when its stat changed). */
    const sha256Of = async (file: string, signal: AbortSignal): Promise<{ sha256: string; bytes: number } | undefined> => {
      if (!isRegularFile(file)) return undefined;
      const hashes = HashCache.load(path.join(cfg.stateDir, 'hashes-backup-verda.json'));
      const st = fs.lstatSync(file, { bigint: true });
      const { sha256, fingerprint } = await hashes.hash(file, { size: st.size, mtimeNs: st.mtimeNs, ino: st.ino }, signal);
      saveCache(hashes);
      return { sha256, bytes: fingerprint?.size ?? Number(st.size) };
    };

    const models = modelsStep({
      host: verda,
      scriptsDir: cfg.verdaScriptsDir,
      target: modelsBucket,
      modelsDir: cfg.verdaModelsDir,
      sfsBackupDir: cfg.sfsBackupDir,
      limits: cfg.limits,
      skipReason: quickOnly,
      onObject: (o) => r2.push(o),
    });

    const bundle: Step = {
      name: 'Config bundle to R2',
      moves: `this run's config artifacts → ${cache.name}/${BUNDLE_KEY} and ${BUNDLE_PREFIX}verda-config-backup-${stamp}.tar.gz`,
      async run(ctx) {
        const config = artifacts.filter((a) => a.name !== IMAGE_FILE);
        const dated = `${BUNDLE_PREFIX}verda-config-backup-${stamp}.tar.gz`;
        if (ctx.dryRun) return { summary: `would send the run's config artifacts as ${BUNDLE_KEY} and ${dated}` };
        // An incomplete bundle must not replace the last good one under the latest key.
        const failed = ctx.earlier.filter((r) => r.status !== 'ok' && r.status !== 'skipped' && r.name !== image.name && r.name !== models.name);
        if (failed.length) throw new Error(`not sent, ${failed.map((r) => r.name).join(', ')} failed: R2 keeps the previous bundle`);
        if (!config.length) throw new Error('no config artifact was written: nothing to bundle');
        const tmp = path.join(dir, `.verda-config-backup-${stamp}.tar.gz`);
        try {
          const b = await bundleFiles(config.map((a) => path.join(dir, a.name)), tmp, ctx.signal);
          for (const key of [BUNDLE_KEY, dated]) {
            await cache.put(key, fingerprintedSource(tmp, b.fingerprint), { metadata: { sha256: b.sha256 }, signal: ctx.signal });
            r2.push({ bucket: cacheBucket.bucket, key, bytes: b.bytes, sha256: b.sha256, action: 'uploaded' });
          }
          return { summary: `${config.length} artifacts (${humanSize(b.bytes)}) sent as ${BUNDLE_KEY} and ${dated}`, bytes: b.bytes * 2 };
        } finally {
          fs.rmSync(tmp, { force: true });
        }
      },
    };

    const manifestName = `manifest-${stamp}.json`;
    const manifest: Step = {
      name: 'Manifest',
      moves: `→ ${dir}/${manifestName}`,
      async run(ctx) {
        if (ctx.dryRun) return { summary: `would write ${manifestName}` };
        const failedSteps = ctx.earlier.filter((r) => r.status === 'failed').map((r) => r.name);
        const body: Manifest = {
          version: 1,
          script: 'backup-verda',
          timestamp: stamp,
          mode: full ? 'full' : 'quick',
          verdaHost: cfg.verdaHost,
          imageId,
          complete: failedSteps.length === 0,
          failedSteps,
          artifacts,
          r2,
        };
        ensurePrivateDir(dir);
        writeFileAtomic(path.join(dir, manifestName), JSON.stringify(body, null, 2) + '\n', 0o600);
        return { summary: `${manifestName}: ${artifacts.length} artifacts, ${r2.length} R2 objects` };
      },
    };

    const rotation = rotationStep({
      where: `${dir} and ${cache.name}/${BUNDLE_PREFIX}`,
      keep: cfg.keepBackups,
      rotate: async (signal) => [
        ...archives.flatMap((a) => rotateLocal(dir, a.kind, 'tar.gz', cfg.keepBackups)),
        ...rotateLocal(dir, 'manifest', 'json', cfg.keepBackups),
        ...(await rotateRemote(cache, BUNDLE_PREFIX, 'verda-config-backup', 'tar.gz', cfg.keepBackups, signal)),
      ],
      inspect: () => [...archives.map((a) => a.kind), 'manifest'].flatMap((k) => copyWarnings(dir, k, k === 'manifest' ? 'json' : 'tar.gz')),
    });

    return {
      steps: [
        ...archives.map((spec) => archiveStep({ host: verda, spec, dir, stamp, onArtifact: record })),
        tailscaleIp,
        image,
        models,
        bundle,
        manifest,
        rotation,
      ],
      close: () => verda.close(),
      workDirs: [dir],
    };
  },
});

/**
 * The image last saved (worker-image.id) and the sha256 of its saved copy (worker-image.sha256,
 * in sha256sum's format). Either missing or damaged records nothing: the image is saved again.
 */
function readImageRecord(idFile: string, shaFile: string): { imageId: string; sha256: string } | undefined {
  try {
    const imageId = readRegularFileSync(idFile).toString('utf8').trim();
    const sha256 = /^([0-9a-f]{64}) /.exec(readRegularFileSync(shaFile).toString('utf8'))?.[1];
    return imageId && sha256 ? { imageId, sha256 } : undefined;
  } catch {
    return undefined;
  }
}

function sha256Text(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}
