#!/bin/sh
//bin/true; exec "$(dirname "$(readlink -f "$0")")/lib/launch.sh" "$0" "$@"
// (The two lines above are run by sh and are comments to Node: lib/launch.sh starts Node with
// this script, found beside it whatever the working directory. See README "How the scripts run".)

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
import { bucketName, bucketTarget, requireDirOrAbsent, type Config } from './lib/config.ts';
import { imageStep } from './lib/image.ts';
import { RunRecord, manifestStep, verifyArtifactsStep, verifyObjectsStep } from './lib/manifest.ts';
import { CONFIG_KINDS } from './lib/layout.ts';
import { modelsStep } from './lib/models.ts';
import { runScript, type Plan } from './lib/script.ts';
import { bucketBackend, configuredBuckets } from './lib/r2.ts';
import { PointJudge, judgeAll, listRestorePoints, newestPointStep, usable } from './lib/restore-point.ts';
import { copyWarnings, timestamp } from './lib/dated.ts';
import { rotateByRestorePoints, rotationStep } from './lib/rotation.ts';
import { lazyHost } from './lib/ssh.ts';
import { verdaStatus } from './lib/status.ts';

await runScript({
  name: 'backup-verda',
  title: (f) => `=== Verda → Mello and R2 (${f.quick ? 'quick: config only' : 'full'}) ===`,
  usage: `Usage: backup-verda.mts [--full | --quick] [--dry-run | --verify [--deep]] [--json] [-v] [--env-file PATH]
       backup-verda.mts --status | --list [--json]

Run on Mello before Verda is shut down. Archives Verda's identity and config (tailscale, SSH host
keys, fail2ban, ufw, .env, home, project, oh-my-zsh) into BACKUP_DIR as KIND-YYYYMMDD-HHMMSS.tar.gz
and sends a bundle of them to the R2 cache bucket. A full run (the default) also saves the worker
image when its ID changed and sends every *.safetensors under VERDA_MODELS_DIR from Verda straight
to the R2 models bucket. --quick: config only. Keeps KEEP_BACKUPS dated copies of each kind.
With AGE_RECIPIENTS set, the bundle is age-encrypted before it leaves Mello (.tar.gz.age);
--verify --deep then decrypts it with AGE_IDENTITY_FILE.`,
  status: (cfg) => verdaStatus(cfg),
  list: (cfg, json) => listRestorePoints(judgeOf(cfg), json),
  async plan(cfg, flags) {
    requireDirOrAbsent(cfg, 'BACKUP_DIR');
    requireDirOrAbsent(cfg, 'COMFYMULTI_STATE_DIR');
    if (flags.verify) return verifyPlan(cfg, flags.deep);
    const ageRecipients = cfg.ageRecipients && (await loadRecipients(cfg.ageRecipients));
    const quick = flags.quick ? '--quick' : undefined; // leaves the image and the models out
    const dir = cfg.backupDir;
    const verda = lazyHost(cfg.verdaHost, { configFile: cfg.sshConfig, sudo: cfg.verdaSudo, limits: cfg.limits });
    const cacheTarget = bucketTarget(cfg, 'cache');
    const cacheBucket = bucketBackend(cfg, 'cache');
    const record = new RunRecord(timestamp());

    const archives = configArchives(cfg).map((spec) => archiveStep({ host: verda, spec, dir, record }));
    const configSteps = [...archives, tailscaleIpStep({ host: verda, dir, record })];
    // The config bundle goes before the long steps: a run stopped during them still has it in R2.
    return {
      steps: [
        ...configSteps,
        bundleStep({ dir, cacheBucket, bucket: cacheTarget.bucket, record, configSteps, ageRecipients }),
        imageStep({
          host: verda,
          cli: cfg.containerCli,
          image: cfg.containerImage,
          dir,
          cacheBucket,
          bucket: cacheTarget.bucket,
          record,
          stateDir: cfg.stateDir,
          skipReason: quick,
        }),
        modelsStep({
          host: verda,
          target: quick ? undefined : bucketTarget(cfg, 'models'),
          modelsDir: cfg.verdaModelsDir,
          sfsBackupDir: cfg.sfsBackupDir,
          limits: cfg.limits,
          record,
          sfsMount: cfg.sfsMount,
          skipReason: quick,
        }),
        manifestStep({ dir, record, mode: quick ? 'quick' : 'full', verdaHost: cfg.verdaHost }),
        rotationStep({
          where: `${dir} and ${cacheBucket.name}/${BUNDLE_PREFIX}`,
          keep: cfg.keepBackups,
          what: `the ${cfg.keepBackups} newest whole restore points and the newest whole one with the worker image`,
          rotate: (signal) => rotate(cfg, ageRecipients, signal),
          inspect: () =>
            [...CONFIG_KINDS, 'manifest'].flatMap((k) => copyWarnings(dir, k, k === 'manifest' ? 'json' : 'tar.gz')),
        }),
      ],
      close: () => verda.close(),
      workDirs: [dir],
    };
  },
});

/**
 * BACKUP_DIR by restore points, then R2's dated bundles by their own listing (never one a kept
 * point names, and none while BACKUP_DIR holds fewer than KEEP_BACKUPS points of its own).
 */
async function rotate(cfg: Config, recipients: string[] | undefined, signal: AbortSignal) {
  const cacheBucket = bucketBackend(cfg, 'cache');
  const judge = new PointJudge({
    backupDir: cfg.backupDir,
    buckets: configuredBuckets(cfg, ['cache', 'models']),
    cacheBucket: cacheBucket.target.bucket,
    stateDir: cfg.stateDir,
    signal,
  });
  const judged = await judgeAll(judge);
  const local = rotateByRestorePoints(cfg.backupDir, judged, cfg.keepBackups, CONFIG_KINDS);
  const usableKept = local.kept.filter(usable);
  const r2 = await rotateBundles(
    cacheBucket,
    cfg.keepBackups,
    {
      keptStamps: new Set(usableKept.map((p) => p.stamp)),
      trim: usableKept.length >= cfg.keepBackups,
      encryptTo: recipients,
      tmpDir: cfg.backupDir,
    },
    signal,
  );
  const cacheWarning = judge.finish();
  return {
    deleted: [...local.deleted, ...r2.deleted],
    notes: [...local.notes, ...r2.notes, ...(cacheWarning ? [cacheWarning] : [])],
  };
}

/** The restore points of BACKUP_DIR, judged against the cache and models buckets configured here. */
function judgeOf(cfg: Config, buckets = configuredBuckets(cfg, ['cache', 'models'])) {
  return new PointJudge({
    backupDir: cfg.backupDir,
    buckets,
    cacheBucket: bucketName(cfg, 'cache'),
    stateDir: cfg.stateDir,
  });
}

/** --verify: from the newest manifest alone, no SSH, so it works once Verda is gone. */
function verifyPlan(cfg: Config, deep: boolean): Plan {
  const backends = configuredBuckets(cfg, ['cache', 'models']);
  const judge = () => judgeOf(cfg, backends);
  const objects = verifyObjectsStep(cfg.backupDir, backends, deep, { ageIdentityFile: cfg.ageIdentityFile });
  return { steps: [verifyArtifactsStep(cfg.backupDir), objects, newestPointStep({ judge })] };
}
