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
import { bucketTarget } from './lib/config.ts';
import { ensurePrivateDir, writeFileAtomic } from './lib/files.ts';
import { verifyArtifactsStep, verifyObjectsStep, type Manifest, type R2Record } from './lib/manifest.ts';
import { MODELS_FLAG, modelsStep, runModelsHere } from './lib/models.ts';
import { runScript, type Step } from './lib/plan.ts';
import { R2Backend, r2Limits } from './lib/r2.ts';
import { rotateLocal, rotateRemote, rotationStep, timestamp } from './lib/rotation.ts';
import { lazyHost } from './lib/ssh.ts';
import { fileSource, type Backend } from './lib/storage.ts';

// Verda's side of the models step (see lib/models.ts): not a flag for people.
if (process.argv.includes(MODELS_FLAG)) await runModelsHere();

const IMAGE_FILE = 'worker-image.tar.gz';
const IMAGE_ID_FILE = 'worker-image.id';
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
    const verda = lazyHost(cfg.verdaHost, { configFile: cfg.sshConfig, sudo: cfg.verdaSudo });
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
        // No tailscale on Verda is "unknown"; no Verda at all is a failure (the run throws).
        const r = await verda.run(['sh', '-c', 'command -v tailscale >/dev/null && tailscale ip -4'], { signal: ctx.signal });
        const ip = (r.code === 0 && r.stdout.trim().split('\n')[0]) || 'unknown';
        if (ctx.dryRun) return { summary: `would write tailscale-ip.txt (${ip})` };
        ensurePrivateDir(dir);
        writeFileAtomic(path.join(dir, 'tailscale-ip.txt'), `${ip}\n`, 0o600);
        record({ name: 'tailscale-ip.txt', bytes: ip.length + 1, sha256: sha256Text(`${ip}\n`) });
        return { summary: `tailscale-ip.txt: ${ip}`, warnings: ip === 'unknown' ? ['tailscale ip -4 failed on Verda: wrote "unknown"'] : [] };
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
        const lastId = fs.existsSync(idFile) ? fs.readFileSync(idFile, 'utf8').trim() : undefined;
        const there = await cache.head(IMAGE_FILE, ctx.signal);
        if (lastId === imageId && fs.existsSync(file) && there?.metadata['image-id'] === imageId) {
          r2.push({ bucket: cacheBucket.bucket, key: IMAGE_FILE, bytes: there.size, sha256: there.metadata.sha256 ?? '', action: 'skipped' });
          return { summary: `image ${short} unchanged since the last backup: not saved again` };
        }
        if (ctx.dryRun) return { summary: `would save image ${short} to ${file} and send it to ${cache.name}/${IMAGE_FILE}` };
        ensurePrivateDir(dir);
        // gzip level 1: the image is gigabytes and Mello is a small VPS; speed over a few % of size.
        const saved = await commandToGzipFile(verda, [cli, 'save', cfg.containerImage], file, { signal: ctx.signal, level: 1 });
        artifacts.push({ name: IMAGE_FILE, bytes: saved.bytes, sha256: saved.sha256 });
        const started = Date.now();
        let sent = 0;
        await cache.put(IMAGE_FILE, fileSource(file, saved.bytes), {
          metadata: { sha256: saved.sha256, 'image-id': imageId },
          signal: ctx.signal,
          onBytes: ctx.out.fancy ? (n) => ctx.out.progress(IMAGE_FILE, (sent += n), saved.bytes, started) : undefined,
        });
        r2.push({ bucket: cacheBucket.bucket, key: IMAGE_FILE, bytes: saved.bytes, sha256: saved.sha256, action: 'uploaded' });
        writeFileAtomic(idFile, `${imageId}\n`, 0o600); // only once both copies are complete
        return { summary: `${IMAGE_FILE}: image ${short} (${humanSize(saved.bytes)}), saved and sent`, bytes: saved.bytes };
      },
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
            await cache.put(key, fileSource(tmp, b.bytes), { metadata: { sha256: b.sha256 }, signal: ctx.signal });
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
    };
  },
});

function sha256Text(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}
