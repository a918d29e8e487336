// The CDK app: `npx cdk synth` (offline) or `npx cdk deploy`. Every value comes from
// cdk.json's context; override with -c key=value or edit cdk.json.
import { App } from 'aws-cdk-lib';
import { WalshoreStack } from '../lib/walshore-stack.ts';

const app = new App();
const ctx = (key: string): string => {
  const v = app.node.tryGetContext(key);
  if (v === undefined || v === '') throw new Error(`cdk.json context "${key}" is required`);
  return String(v);
};
const optional = (key: string): string | undefined => app.node.tryGetContext(key) || undefined;
const list = (key: string): string[] => ctx(key).split(',').map((s) => s.trim());

new WalshoreStack(app, optional('stackName') ?? 'Walshore', {
  env: { account: ctx('account'), region: ctx('region') },
  vpcId: ctx('vpcId'),
  availabilityZones: list('availabilityZones'),
  privateSubnetIds: list('privateSubnetIds'),
  database: {
    host: ctx('dbHost'),
    port: Number(optional('dbPort') ?? 5432),
    name: ctx('dbName'),
    user: ctx('dbUser'),
    instanceIdentifier: ctx('dbInstanceIdentifier'),
    securityGroupId: ctx('dbSecurityGroupId'),
    passwordSecretArn: optional('dbPasswordSecretArn'),
    iamAuth: String(optional('dbIamAuth')) === 'true',
    resourceId: optional('dbResourceId'),
  },
  publication: optional('publication'),
  slot: optional('slot'),
  bucketName: optional('bucketName'),
  bucketKmsKeyArn: optional('bucketKmsKeyArn'),
  lakePrefix: optional('lakePrefix'),
  glueDatabase: optional('glueDatabase'),
  alarmEmail: optional('alarmEmail'),
});
