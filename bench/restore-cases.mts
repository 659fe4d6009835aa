// The restore cases of `npm run bench`, on the link (bench/wan-proxy.mts) between R2 and the
// machines. Mello and Verda are both this machine: Verda is a real sshd on loopback, reached
// through a raw TCP forward on the same link, so ssh's own round trips cost what they would and
// what Mello relays to Verda shares the way towards the machines with what R2 sends them.
// - models: restore-verda --only models (Verda downloads the models bucket) against `aws s3 sync`
//   of the same bucket, each into an empty directory, alternated;
// - morning, "a fresh Verda from R2 alone": restore-verda --from r2 with an empty BACKUP_DIR on
//   Mello and Verda's paths (VERDA_SYSROOT, VERDA_HOME, ..., SFS) in an empty tree, so everything
//   comes from R2: the config bundle, the worker image (downloaded by Verda into its SFS copy
//   through a presigned URL, and loaded with podman, as root) and the models. Its floor (issue
//   22's, from when Mello relayed the image): models / cap + 2 × image / cap (the image crossed
//   the link twice: R2 to Mello, Mello to Verda) + the image's load alone + 3 round trips. Beside it, as a baseline only, `aws s3 sync` of the models and `aws s3 cp` of the
//   image, one after the other, on one machine (no relay, no load).
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { R2Backend } from '../lib/r2.ts';
import { syncTree } from '../lib/sync.ts';
import { ROOT, writeRandomFile } from '../test/helpers.ts';
import { startSshd, type Sshd } from '../test/sshd.ts';
import { makeVerda, type VerdaFixture } from '../test/verda-fixture.ts';
import { baseEnv, measure, median, MiB, VERDA_BUNDLE_MARKER, work, type Measure } from './common.mts';
import type { RunningServer } from './servers.mts';
import { Link, TcpForward, WanProxy, type WanProfile } from './wan-proxy.mts';

export const MODELS_BUCKET = 'bench-models';
export const CACHE_BUCKET = 'bench-cache';
export const IMAGE_NAME = 'comfymulti-bench-worker';
const IMAGE_KEY = 'worker-image.tar.gz';
export interface RestoreData {
  models: { dir: string; files: number; size: number; bytes: number };
  image?: { file: string; imageId: string; bytes: number; sha256: string };
  fixture: VerdaFixture;
  /** Mello's BACKUP_DIR holding a --quick backup of the fixture (the models case's restore point). */
  backupDir: string;
  sshd: Sshd;
  stop(): Promise<void>;
}

function sh(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB, ...opts });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}: ${r.stderr || r.stdout}`);
  return r.stdout;
}

const sha256File = (file: string) => sh('sha256sum', ['--', file]).split(' ')[0];

/**
 * The worker image, made once and kept in the work dir: a tarball of random data (`bytes`, in
 * files of 256 MiB at most) imported with podman, saved and gzipped as backup-verda saves it.
 */
function makeImage(bytes: number): NonNullable<RestoreData['image']> {
  const dir = path.join(work, `image-${Math.round(bytes / MiB)}MiB`);
  const file = path.join(dir, IMAGE_KEY);
  const record = path.join(dir, 'image.json');
  if (fs.existsSync(record) && fs.existsSync(file)) return JSON.parse(fs.readFileSync(record, 'utf8'));
  console.log(`making a ${Math.round(bytes / MiB)} MiB worker image in ${dir}…`);
  fs.rmSync(dir, { recursive: true, force: true });
  const rootfs = path.join(dir, 'rootfs');
  for (let i = 0, left = bytes; left > 0; i++, left -= 256 * MiB) {
    writeRandomFile(path.join(rootfs, 'opt/weights', `blob-${i}.bin`), Math.min(left, 256 * MiB));
  }
  fs.mkdirSync(path.join(rootfs, 'etc'));
  fs.writeFileSync(path.join(rootfs, 'etc/motd'), 'comfymulti bench worker image\n');
  const tarball = path.join(dir, 'rootfs.tar');
  sh('tar', ['-C', rootfs, '-cf', tarball, '.']);
  fs.rmSync(rootfs, { recursive: true });
  spawnSync('podman', ['rmi', '--force', IMAGE_NAME]);
  sh('podman', ['import', '--quiet', tarball, IMAGE_NAME]);
  fs.rmSync(tarball);
  const imageId = sh('podman', ['image', 'inspect', '--format', '{{.Id}}', IMAGE_NAME]).trim();
  // As backup-verda saves it: `podman save`, gzip level 1.
  sh('bash', ['-c', 'set -o pipefail; podman save "$1" | gzip -1 > "$2"', 'bash', IMAGE_NAME, file]);
  const r = { file, imageId, bytes: fs.statSync(file).size, sha256: sha256File(file) };
  fs.writeFileSync(record, JSON.stringify(r));
  return r;
}

/** Models, buckets, the fixture's --quick backup and (for the morning) the image, in the server. */
export async function prepareRestoreData(
  srv: RunningServer,
  o: { files: number; size: number; imageBytes?: number },
): Promise<RestoreData> {
  const dir = path.join(work, `models-${o.files}x${o.size}`);
  if (!fs.existsSync(path.join(dir, '.complete'))) {
    console.log(`making ${o.files} models of ${o.size / MiB} MiB in ${dir}…`);
    fs.rmSync(dir, { recursive: true, force: true });
    for (let i = 0; i < o.files; i++) writeRandomFile(path.join(dir, `checkpoints/model-${i}.safetensors`), o.size);
    fs.writeFileSync(path.join(dir, '.complete'), '');
  }
  const admin = new S3Client({ endpoint: srv.endpoint, region: 'auto', forcePathStyle: true, credentials: srv.keys });
  try {
    for (const b of [MODELS_BUCKET, CACHE_BUCKET]) {
      await admin.send(new CreateBucketCommand({ Bucket: b })).catch((e) => {
        if (!/BucketAlready/.test(String(e?.name ?? e))) throw e;
      });
    }
  } finally {
    admin.destroy();
  }
  const target = (bucket: string) => ({ bucket, endpoint: srv.endpoint, ...srv.keys });
  // The models bucket as backup-verda leaves it: sha256 metadata on every object (sent directly).
  const sent = await syncTree({
    root: dir,
    backend: new R2Backend(target(MODELS_BUCKET)),
    prefix: '',
    filter: (rel) => rel.endsWith('.safetensors'),
  });
  if (sent.failures.length) throw new Error(`models upload: ${JSON.stringify(sent.failures)}`);

  const fixtureRoot = path.join(work, 'restore-fixture');
  fs.rmSync(fixtureRoot, { recursive: true, force: true });
  const fixture = makeVerda(path.join(fixtureRoot, 'verda'));
  const backupDir = path.join(fixtureRoot, 'mello-backups');
  // A --quick backup of the fixture: Mello's restore point (the models case) and the cache
  // bucket's config bundle (the morning's --from r2).
  const quick = spawnSync(path.join(ROOT, 'backup-verda.mts'), ['--quick'], {
    env: {
      ...baseEnv,
      ...fixture.env,
      R2_ENDPOINT: srv.endpoint,
      R2_ACCESS_KEY_ID: srv.keys.accessKeyId,
      R2_SECRET_ACCESS_KEY: srv.keys.secretAccessKey,
      R2_MODELS_BUCKET: MODELS_BUCKET,
      R2_CACHE_BUCKET: CACHE_BUCKET,
      VERDA_HOST: 'local',
      BACKUP_DIR: backupDir,
      COMFYMULTI_STATE_DIR: path.join(fixtureRoot, 'state'),
      SFS_MOUNT: '',
    },
    encoding: 'utf8',
  });
  if (quick.status !== 0) throw new Error(`backup-verda --quick: ${quick.stdout}${quick.stderr}`);

  let image: RestoreData['image'];
  if (o.imageBytes) {
    image = makeImage(o.imageBytes);
    // As backup-verda sends it: the image ID and the archive's sha256 in its metadata.
    sh(
      'aws',
      [
        's3',
        'cp',
        image.file,
        `s3://${CACHE_BUCKET}/${IMAGE_KEY}`,
        '--endpoint-url',
        srv.endpoint,
        '--metadata',
        `sha256=${image.sha256},image-id=${image.imageId}`,
        '--only-show-errors',
      ],
      { env: awsEnv(srv) },
    );
  }
  // BENCH_CPU_PROF=1: every Node on "Verda" (the models download) writes a CPU profile: a `node`
  // first on the sessions' PATH adds --cpu-prof (which NODE_OPTIONS may not carry).
  const profDir = path.join(work, 'cpu-prof');
  const wrapperDir = path.join(work, 'cpu-prof-bin');
  if (process.env.BENCH_CPU_PROF === '1') {
    fs.mkdirSync(wrapperDir, { recursive: true });
    fs.writeFileSync(
      path.join(wrapperDir, 'node'),
      `#!/bin/sh\nexec '${process.execPath}' --cpu-prof --cpu-prof-dir='${profDir}' "$@"\n`,
      { mode: 0o755 },
    );
  }
  const sshd = await startSshd(
    ['verda'],
    process.env.BENCH_CPU_PROF === '1' ? [`SetEnv "PATH=${wrapperDir}:/usr/local/bin:/usr/bin:/bin"`] : [],
  );
  return {
    models: { dir, files: o.files, size: o.size, bytes: o.files * o.size },
    image,
    fixture,
    backupDir,
    sshd,
    async stop() {
      await sshd.stop();
      fs.rmSync(fixtureRoot, { recursive: true, force: true });
    },
  };
}

const awsEnv = (srv: RunningServer): NodeJS.ProcessEnv => ({
  ...baseEnv,
  AWS_ACCESS_KEY_ID: srv.keys.accessKeyId,
  AWS_SECRET_ACCESS_KEY: srv.keys.secretAccessKey,
  AWS_DEFAULT_REGION: 'us-east-1',
  AWS_PAGER: '',
});

/** The link of one profile: the R2 proxy and the ssh forward to "Verda" on it. */
export interface RestoreLink {
  link: Link;
  proxy: WanProxy;
  ssh: TcpForward;
  sshConfig: string;
  close(): Promise<void>;
}

export async function openRestoreLink(
  srv: RunningServer,
  data: RestoreData,
  profile: WanProfile,
): Promise<RestoreLink> {
  const link = new Link(profile);
  const proxy = await WanProxy.start(srv.endpoint, link);
  // Mello → Verda: what Mello sends draws on the way towards the machines, as R2's answers do.
  const ssh = await TcpForward.start({ host: '127.0.0.1', port: data.sshd.port }, link, 'down');
  const dir = data.sshd.dir;
  const sshConfig = path.join(dir, `ssh_config-${profile.name.replace(/\W+/g, '_')}`);
  const hostKey = fs.readFileSync(path.join(dir, 'host_key.pub'), 'utf8').trim().split(' ').slice(0, 2).join(' ');
  fs.writeFileSync(path.join(dir, 'known_hosts_bench'), `verda-bench ${hostKey}\n`);
  fs.writeFileSync(
    sshConfig,
    [
      'Host verda',
      '  HostName 127.0.0.1',
      `  Port ${ssh.port}`,
      `  User ${process.env.USER || 'root'}`,
      `  IdentityFile ${dir}/user_key`,
      '  IdentitiesOnly yes',
      '  HostKeyAlias verda-bench',
      `  UserKnownHostsFile ${dir}/known_hosts_bench`,
      '  StrictHostKeyChecking yes',
      '  LogLevel ERROR',
      '',
    ].join('\n'),
  );
  return {
    link,
    proxy,
    ssh,
    sshConfig,
    async close() {
      await ssh.close();
      await proxy.close();
    },
  };
}

/** What restore-verda --json says of its steps: name → seconds, and whether all went well. */
export function stepSeconds(m: Measure): { ok: boolean; steps: { name: string; s: number; status: string }[] } {
  try {
    const json = JSON.parse(m.stdout.slice(m.stdout.indexOf('\n{') + 1));
    return {
      ok: json.ok,
      steps: json.steps.map((s: { name: string; ms: number; status: string }) => ({
        name: s.name,
        s: s.ms / 1000,
        status: s.status,
      })),
    };
  } catch {
    return { ok: false, steps: [] };
  }
}

function fresh(name: string): string {
  const dir = path.join(work, name);
  fs.rmSync(dir, { recursive: true, force: true });
  return dir;
}

/** Untimed, before each run: what the run before left dirty is written out now, not during this one. */
const settle = () => spawnSync('sync');

export interface ModelsRun {
  ours: Measure[];
  aws: Measure[];
  /** The models step's own seconds, per run of ours. */
  modelsStep: number[];
  /** A second restore into the same root: nothing to download. */
  noop?: Measure;
}

/** The models restore on one profile: `runs` of each, alternated, each into an empty directory. */
export async function modelsRestoreCase(
  srv: RunningServer,
  data: RestoreData,
  rl: RestoreLink,
  runs: number,
  timeoutS: number,
): Promise<ModelsRun> {
  const label = rl.link.profile.name;
  const env: NodeJS.ProcessEnv = {
    ...baseEnv,
    ...data.fixture.env,
    R2_ENDPOINT: rl.proxy.endpoint,
    R2_ACCESS_KEY_ID: srv.keys.accessKeyId,
    R2_SECRET_ACCESS_KEY: srv.keys.secretAccessKey,
    R2_MODELS_BUCKET: MODELS_BUCKET,
    R2_CACHE_BUCKET: CACHE_BUCKET,
    BACKUP_DIR: data.backupDir,
    COMFYMULTI_STATE_DIR: path.join(work, 'restore-state'),
    VERDA_HOST: 'verda',
    SSH_CONFIG: rl.sshConfig,
    VERDA_SUDO: '',
    SFS_MOUNT: '',
  };
  const o = { proxy: rl.proxy, link: rl.link, timeoutS };
  const result: ModelsRun = { ours: [], aws: [], modelsStep: [] };
  const oursRoot = path.join(work, 'restore-ours');
  const ours = async (root: string, what: string) => {
    settle();
    return measure(path.join(ROOT, 'restore-verda.mts'), ['--only', 'models', '--root', root, '--json'], env, {
      ...o,
      remoteMarker: VERDA_BUNDLE_MARKER,
      label: `${label}-models-ours-${what}`,
    });
  };
  for (let i = 0; i < runs; i++) {
    // Alternated: neither always runs on a cache the other warmed.
    for (const tool of i % 2 ? ['ours', 'aws'] : ['aws', 'ours']) {
      process.stdout.write(`${label}, models restore: ${tool} run ${i + 1}… `);
      let m: Measure;
      if (tool === 'ours') {
        m = await ours(fresh('restore-ours'), `run${i + 1}`);
        const steps = stepSeconds(m);
        const step = steps.steps.find((s) => s.name.startsWith('Models'));
        if (!m.error && (!steps.ok || !step)) m.error = `restore-verda did not succeed: ${m.stdout.slice(-2000)}`;
        if (step) result.modelsStep.push(step.s);
        result.ours.push(m);
      } else {
        const dest = fresh('restore-aws');
        settle();
        m = await measure(
          'aws',
          ['s3', 'sync', `s3://${MODELS_BUCKET}`, dest, '--endpoint-url', rl.proxy.endpoint, '--only-show-errors'],
          awsEnv(srv),
          { ...o, label: `${label}-models-aws-run${i + 1}` },
        );
        result.aws.push(m);
      }
      console.log(m.error ? `FAILED ${m.error}` : `${m.seconds.toFixed(2)} s, ${m.requests} requests`);
    }
  }
  result.noop = await ours(oursRoot, 'noop');
  for (const d of ['restore-ours', 'restore-aws']) fs.rmSync(path.join(work, d), { recursive: true, force: true });
  return result;
}

export interface MorningRun {
  ours: Measure[];
  /** restore-verda's steps of each run, seconds. */
  steps: { name: string; s: number; status: string }[][];
  baseline: Measure[];
}

/** The image's load alone: `gzip -dc | podman load` of the archive, after `podman rmi`; `runs` times. */
export function loadAlone(data: RestoreData, runs: number): number[] {
  const times: number[] = [];
  for (let i = 0; i < runs; i++) {
    spawnSync('podman', ['rmi', '--force', IMAGE_NAME], { stdio: 'ignore' });
    settle();
    const t = performance.now();
    sh('sh', ['-c', 'gzip -dc -- "$1" | podman load', 'sh', data.image!.file]);
    times.push((performance.now() - t) / 1000);
  }
  return times;
}

/** A stand-in systemctl on a fresh Verda: every service call succeeds. */
function systemctlStub(): string {
  const file = path.join(work, 'systemctl-stub');
  fs.writeFileSync(file, '#!/bin/sh\nexit 0\n', { mode: 0o755 });
  return file;
}

export async function morningCase(
  srv: RunningServer,
  data: RestoreData,
  rl: RestoreLink,
  runs: number,
  timeoutS: number,
): Promise<MorningRun> {
  const label = rl.link.profile.name;
  const o = { proxy: rl.proxy, link: rl.link, timeoutS };
  const result: MorningRun = { ours: [], steps: [], baseline: [] };
  const loaded = () =>
    spawnSync('podman', ['image', 'inspect', '--format', '{{.Id}}', IMAGE_NAME], { encoding: 'utf8' }).stdout.trim();
  for (let i = 0; i < runs; i++) {
    for (const tool of i % 2 ? ['ours', 'aws'] : ['aws', 'ours']) {
      process.stdout.write(`${label}, the morning: ${tool} run ${i + 1}… `);
      let m: Measure;
      if (tool === 'ours') {
        // A fresh Verda (nothing on its disk or SFS, the image not loaded) and a fresh Mello
        // (an empty BACKUP_DIR and state: the image can only come from R2).
        const tree = fresh('morning-verda');
        const mello = fresh('morning-mello');
        spawnSync('podman', ['rmi', '--force', IMAGE_NAME], { stdio: 'ignore' });
        settle();
        m = await measure(
          path.join(ROOT, 'restore-verda.mts'),
          ['--from', 'r2', '--json'],
          {
            ...baseEnv,
            R2_ENDPOINT: rl.proxy.endpoint,
            R2_ACCESS_KEY_ID: srv.keys.accessKeyId,
            R2_SECRET_ACCESS_KEY: srv.keys.secretAccessKey,
            R2_MODELS_BUCKET: MODELS_BUCKET,
            R2_CACHE_BUCKET: CACHE_BUCKET,
            BACKUP_DIR: path.join(mello, 'backups'),
            COMFYMULTI_STATE_DIR: path.join(mello, 'state'),
            VERDA_HOST: 'verda',
            SSH_CONFIG: rl.sshConfig,
            VERDA_SUDO: '',
            VERDA_SYSROOT: path.join(tree, 'sys'),
            VERDA_HOME: path.join(tree, 'home/dev'),
            VERDA_PROJECT_DIR: path.join(tree, 'home/dev/comfy-multi'),
            VERDA_MODELS_DIR: path.join(tree, 'sfs/models'),
            SFS_BACKUP_DIR: path.join(tree, 'sfs/cache/backups'),
            SFS_MOUNT: '',
            VERDA_SYSTEMCTL: systemctlStub(),
            CONTAINER_CLI: 'podman',
            CONTAINER_IMAGE: IMAGE_NAME,
          },
          { ...o, remoteMarker: VERDA_BUNDLE_MARKER, label: `${label}-morning-ours-run${i + 1}` },
        );
        const steps = stepSeconds(m);
        result.steps.push(steps.steps);
        const failed = steps.steps.filter((s) => s.status === 'failed').map((s) => s.name);
        if (!m.error && failed.length) m.error = `steps failed: ${failed.join(', ')}`;
        if (!m.error && loaded() !== data.image!.imageId.replace(/^sha256:/, ''))
          m.error = `the image loaded is ${loaded() || 'none'}, not ${data.image!.imageId}`;
        result.ours.push(m);
      } else {
        const dest = fresh('morning-aws');
        settle();
        m = await measure(
          'sh',
          [
            '-c',
            'aws s3 sync "s3://$1" "$3/models" --endpoint-url "$4" --only-show-errors && ' +
              'aws s3 cp "s3://$2/worker-image.tar.gz" "$3/worker-image.tar.gz" --endpoint-url "$4" --only-show-errors',
            'sh',
            MODELS_BUCKET,
            CACHE_BUCKET,
            dest,
            rl.proxy.endpoint,
          ],
          awsEnv(srv),
          { ...o, label: `${label}-morning-aws-run${i + 1}` },
        );
        result.baseline.push(m);
      }
      console.log(m.error ? `FAILED ${m.error}` : `${m.seconds.toFixed(1)} s, ${m.requests} requests`);
    }
  }
  for (const d of ['morning-verda', 'morning-mello', 'morning-aws'])
    fs.rmSync(path.join(work, d), { recursive: true, force: true });
  return result;
}

/** The morning's floor on a capped profile: models / cap + 2 × image / cap + load + 3 round trips. */
export function morningFloor(data: RestoreData, profile: WanProfile, load: number[]) {
  const cap = profile.capBytesPerSecond;
  const terms = {
    models: data.models.bytes / cap,
    image: (2 * data.image!.bytes) / cap,
    load: median(load),
    rtts: (3 * profile.rttMs) / 1000,
  };
  return { ...terms, total: terms.models + terms.image + terms.load + terms.rtts };
}
