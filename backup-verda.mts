#!/bin/sh
':' //; exec "$(dirname "$(readlink -f "$0")")/lib/launch.sh" "$0" "$@"
// (The two lines above are read by sh and ignored by Node: lib/launch.sh starts Node with this
// script, found beside it whatever the working directory. See README "How the scripts run".)

// backup-verda: run on Mello before Verda is shut down. Verda's identity and config to
// BACKUP_DIR on Mello and to the R2 cache bucket; in a full run also the worker image, and the
// models straight from Verda to the R2 models bucket. One SSH connection for the whole run.
import { loadRecipients } from './lib/age.ts';
import {
  BUNDLE_PREFIX,
  archiveStep,
  bundleStep,
  configArchives,
  rotateBundles,
  tailscaleIpStep,
} from './lib/archive.ts';
import { bucketTarget, requireDirOrAbsent, type Config } from './lib/config.ts';
import { imageStep } from './lib/image.ts';
import { RunRecord, manifestStep, verifyArtifactsStep, verifyObjectsStep } from './lib/manifest.ts';
import { MODELS_FLAG, modelsStep, runModelsHere } from './lib/models.ts';
import { runScript, type Plan } from './lib/plan.ts';
import { R2Backend, r2Limits } from './lib/r2.ts';
import { copyWarnings, rotateLocal, rotationStep, timestamp } from './lib/rotation.ts';
import { lazyHost } from './lib/ssh.ts';
import { verdaStatus } from './lib/status.ts';

// Verda's side of the models step (see lib/models.ts): not a flag for people.
if (process.argv.includes(MODELS_FLAG)) await runModelsHere();

await runScript({
  name: 'backup-verda',
  title: (f) => `=== Verda → Mello and R2 (${f.quick ? 'quick: config only' : 'full'}) ===`,
  usage: `Usage: backup-verda.mts [--full | --quick] [--dry-run] [--json] [-v] [--env-file PATH]

Run on Mello before Verda is shut down. Archives Verda's identity and config (tailscale, SSH host
keys, fail2ban, ufw, .env, home, project, oh-my-zsh) into BACKUP_DIR as KIND-YYYYMMDD-HHMMSS.tar.gz
and sends a bundle of them to the R2 cache bucket. A full run (the default) also saves the worker
image when its ID changed and sends every *.safetensors under VERDA_MODELS_DIR from Verda straight
to the R2 models bucket. --quick: config only. Keeps KEEP_BACKUPS dated copies of each kind.
With AGE_RECIPIENTS set, the bundle is age-encrypted before it leaves Mello (.tar.gz.age);
--verify --deep then decrypts it with AGE_IDENTITY_FILE.`,
  status: (cfg) => verdaStatus(cfg),
  async plan(cfg, flags) {
    requireDirOrAbsent(cfg, 'BACKUP_DIR');
    requireDirOrAbsent(cfg, 'COMFYMULTI_STATE_DIR');
    if (flags.verify) return verifyPlan(cfg, flags.deep);
    const ageRecipients = cfg.ageRecipients && (await loadRecipients(cfg.ageRecipients));
    const quick = flags.quick ? '--quick' : undefined; // leaves the image and the models out
    const dir = cfg.backupDir;
    const verda = lazyHost(cfg.verdaHost, { configFile: cfg.sshConfig, sudo: cfg.verdaSudo, limits: cfg.limits });
    const cacheBucket = bucketTarget(cfg, 'cache');
    const cache = new R2Backend(cacheBucket, r2Limits(cfg.limits));
    const run = new RunRecord(timestamp());

    const archives = configArchives(cfg).map((spec) => archiveStep({ host: verda, spec, dir, run }));
    const configSteps = [...archives, tailscaleIpStep({ host: verda, dir, run })];
    const kinds = [...configArchives(cfg).map((a) => a.kind), 'manifest'];
    return {
      steps: [
        ...configSteps,
        imageStep({
          host: verda,
          cli: cfg.containerCli,
          image: cfg.containerImage,
          dir,
          cache,
          bucket: cacheBucket.bucket,
          run,
          stateDir: cfg.stateDir,
          skipReason: quick,
        }),
        modelsStep({
          host: verda,
          scriptsDir: cfg.verdaScriptsDir,
          target: quick ? undefined : bucketTarget(cfg, 'models'),
          modelsDir: cfg.verdaModelsDir,
          sfsBackupDir: cfg.sfsBackupDir,
          limits: cfg.limits,
          run,
          skipReason: quick,
        }),
        bundleStep({ dir, cache, bucket: cacheBucket.bucket, run, configSteps, ageRecipients }),
        manifestStep({ dir, run, mode: quick ? 'quick' : 'full', verdaHost: cfg.verdaHost }),
        rotationStep({
          where: `${dir} and ${cache.name}/${BUNDLE_PREFIX}`,
          keep: cfg.keepBackups,
          rotate: async (signal) => [
            ...kinds.flatMap((k) => rotateLocal(dir, k, k === 'manifest' ? 'json' : 'tar.gz', cfg.keepBackups)),
            ...(await rotateBundles(cache, cfg.keepBackups, Boolean(ageRecipients), signal)),
          ],
          inspect: () => kinds.flatMap((k) => copyWarnings(dir, k, k === 'manifest' ? 'json' : 'tar.gz')),
        }),
      ],
      close: () => verda.close(),
      workDirs: [dir],
    };
  },
});

/** --verify: from the newest manifest alone, no SSH, so it works once Verda is gone. */
function verifyPlan(cfg: Config, deep: boolean): Plan {
  const buckets = [bucketTarget(cfg, 'cache'), bucketTarget(cfg, 'models')];
  const backends = new Map(buckets.map((b) => [b.bucket, new R2Backend(b, r2Limits(cfg.limits))]));
  const objects = verifyObjectsStep(cfg.backupDir, backends, deep, { ageIdentityFile: cfg.ageIdentityFile });
  return { steps: [verifyArtifactsStep(cfg.backupDir), objects] };
}
