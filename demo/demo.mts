// `npm run demo`: the scripts on embedded stand-ins, no account and no server of yours. A local
// S3 server (s3rver) on loopback plays R2; a sample tree in .demo/ plays Mello's user files and,
// for backup-verda --quick, Verda itself (VERDA_HOST=local: no SSH). With --keep, the S3 server stays
// up after the runs and .demo/.env names it, so that every other command can be tried with
// --env-file .demo/.env, until Ctrl-C.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, s3Env, startS3, writeTree } from '../test/helpers.ts';
import { makeVerda } from '../test/verda-fixture.ts';

const demo = path.join(ROOT, '.demo');
fs.rmSync(demo, { recursive: true, force: true });
const data = path.join(demo, 'mello/data');
writeTree(data, {
  'user_data/user001/workflows/portrait.json': '{"nodes":[]}',
  'user_data/user001/comfy.settings.json': '{"Comfy.ColorPalette":"dark"}',
  'user_data/user002/workflows/landscape with spaces.json': '{"nodes":[1]}',
  'outputs/user001/ComfyUI_00001_.png': Buffer.alloc(300_000, 7),
  'outputs/user002/ComfyUI_00001_.png': Buffer.alloc(120_000, 9),
  'inputs/reference.jpg': Buffer.alloc(50_000, 3),
});
const verda = makeVerda(path.join(demo, 'verda'));

const s3 = await startS3(['comfy-multi-user-files', 'comfy-multi-cache', 'comfy-multi-model-vault-backup']);
const env: NodeJS.ProcessEnv & { BACKUP_DIR: string } = {
  ...process.env,
  ...s3Env(s3, path.join(demo, 'state')),
  ...verda.env,
  MELLO_DATA_DIR: data,
  VERDA_HOST: 'local',
  BACKUP_DIR: path.join(demo, 'mello/backups/verda'),
};
delete env.AWS_CA_BUNDLE;
const keep = process.argv.includes('--keep');

/** The stand-ins' settings as an .env: a restore-verda with it restores into .demo/verda and controls no service. */
function writeDemoEnv(file: string) {
  const settings: Record<string, string> = {
    ...s3Env(s3, path.join(demo, 'state')),
    ...verda.env,
    MELLO_DATA_DIR: data,
    VERDA_HOST: 'local',
    VERDA_SYSTEMCTL: 'true',
    BACKUP_DIR: env.BACKUP_DIR,
  };
  const quote = (v: string) => (/^[\w@%+=:,./-]*$/.test(v) ? v : `'${v}'`);
  const lines = Object.entries(settings).map(([k, v]) => `${k}=${quote(v)}`);
  fs.writeFileSync(file, `# npm run demo -- --keep: the demo's stand-ins, while it runs\n${lines.join('\n')}\n`, {
    mode: 0o600,
  });
}

// Asynchronous: the S3 server lives in this process and must keep answering.
async function run(script: string, ...args: string[]) {
  console.log(`\n$ ./${script} ${args.join(' ')}`);
  const child = spawn(path.join(ROOT, script), args, { env, stdio: 'inherit' });
  const code = await new Promise((resolve) => child.on('close', resolve));
  if (code !== 0) console.log(`(exit ${code})`);
}

try {
  await run('backup-mello.mts');
  await run('backup-mello.mts', '--quick'); // unchanged: nothing is sent again
  await run('backup-verda.mts', '--quick');
  console.log(`\nR2 stand-in at ${s3.endpoint} now holds:`);
  for (const bucket of ['comfy-multi-user-files', 'comfy-multi-cache']) {
    for (const key of await s3.listKeys(bucket)) console.log(`  r2://${bucket}/${key}`);
  }
  console.log(`\nMello's copy of Verda: ${env.BACKUP_DIR}`);
  for (const name of fs.readdirSync(env.BACKUP_DIR).sort()) console.log(`  ${name}`);
  if (keep) {
    const file = path.join(demo, '.env');
    writeDemoEnv(file);
    console.log(`\nThe sample trees are under ${demo}. The S3 server keeps running; ${file} names it. Try:`);
    console.log('  ./backup-verda.mts --env-file .demo/.env --list');
    console.log('  ./restore-mello.mts --env-file .demo/.env --user user001 --to /tmp/lost');
    console.log('  ./restore-verda.mts --env-file .demo/.env --skip-image --dry-run');
    console.log('Ctrl-C stops it.');
    await new Promise<void>((resolve) => {
      process.once('SIGINT', resolve);
      process.once('SIGTERM', resolve);
    });
  } else {
    console.log(`\nThe sample trees are under ${demo}; the S3 server stopped with this demo.`);
  }
} finally {
  await s3.stop();
}
