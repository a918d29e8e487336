// Assertions on the synthesized template, one test per promise of lib/walshore-stack.ts.
// Run offline: `npm test` (tests/deploy.rs runs it with the project's test command).
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { App } from 'aws-cdk-lib';
import { Match, Template } from 'aws-cdk-lib/assertions';
import { WalshoreStack, type WalshoreStackProps } from '../lib/walshore-stack.ts';

const SECRET = 'arn:aws:secretsmanager:us-east-1:111111111111:secret:walshore-db-AbCdEf';

function props(database: Partial<WalshoreStackProps['database']> = {}, extra: Partial<WalshoreStackProps> = {}) {
  return {
    env: { account: '111111111111', region: 'us-east-1' },
    vpcId: 'vpc-0123456789abcdef0',
    availabilityZones: ['us-east-1a', 'us-east-1b'],
    privateSubnetIds: ['subnet-01', 'subnet-02'],
    database: {
      host: 'trading.cluster-x.us-east-1.rds.amazonaws.com',
      name: 'trading',
      user: 'walshore',
      instanceIdentifier: 'trading-1',
      securityGroupId: 'sg-0db',
      passwordSecretArn: SECRET,
      ...database,
    },
    alarmEmail: 'oncall@example.com',
    ...extra,
  } satisfies WalshoreStackProps;
}

function synth(p: WalshoreStackProps = props()): Template {
  return Template.fromStack(new WalshoreStack(new App(), 'Walshore', p));
}

const password = synth();
const iamAuth = synth(props({ iamAuth: true, resourceId: 'db-ABCDEFGHIJKL', passwordSecretArn: undefined }));

/** The one container definition's JSON, tokens and all, as text. */
function container(t: Template): any {
  const defs = Object.values(t.findResources('AWS::ECS::TaskDefinition'));
  assert.equal(defs.length, 1);
  return defs[0].Properties.ContainerDefinitions[0];
}

/** walshore's config as the container receives it (CloudFormation joins resolved to markers). */
function config(t: Template): string {
  const env = container(t).Environment.find((e: any) => e.Name === 'WALSHORE_CONFIG').Value;
  if (typeof env === 'string') return env;
  return env['Fn::Join'][1].map((p: any) => (typeof p === 'string' ? p : `<${JSON.stringify(p)}>`)).join('');
}

/** Every statement of the task role's policies. */
function taskRoleStatements(t: Template): any[] {
  const roles = t.findResources('AWS::IAM::Role', {
    Properties: { AssumeRolePolicyDocument: { Statement: [{ Principal: { Service: 'ecs-tasks.amazonaws.com' } }] } },
  });
  const roleIds = Object.keys(roles).filter((id) => id.startsWith('TaskRole'));
  assert.equal(roleIds.length, 1, `one task role: ${Object.keys(roles)}`);
  const policies = Object.values(t.findResources('AWS::IAM::Policy')).filter((p: any) =>
    p.Properties.Roles.some((r: any) => r.Ref === roleIds[0]),
  );
  return policies.flatMap((p: any) => p.Properties.PolicyDocument.Statement);
}

describe('the Fargate service', () => {
  it('runs exactly one task, stops the old before starting the new, and rolls back a failed deployment', () => {
    password.resourceCountIs('AWS::ECS::Service', 1);
    password.hasResourceProperties('AWS::ECS::Service', {
      DesiredCount: 1,
      LaunchType: 'FARGATE',
      DeploymentConfiguration: {
        MinimumHealthyPercent: 0,
        MaximumPercent: 100,
        DeploymentCircuitBreaker: { Enable: true, Rollback: true },
      },
      NetworkConfiguration: { AwsvpcConfiguration: { AssignPublicIp: 'DISABLED' } },
    });
  });

  it('runs the image built from the Dockerfile, logs to CloudWatch and checks health with walshore health', () => {
    const c = container(password);
    assert.deepEqual(c.Command, ['run', '--config', 'env:WALSHORE_CONFIG']);
    assert.ok(JSON.stringify(c.Image).includes('cdk-hnb659fds-container-assets'), JSON.stringify(c.Image));
    assert.equal(c.LogConfiguration.LogDriver, 'awslogs');
    assert.deepEqual(c.HealthCheck.Command, ['CMD', '/usr/local/bin/walshore', 'health', '--config', 'env:WALSHORE_CONFIG']);
    assert.ok(c.StopTimeout >= 60, 'time to commit the open flush on SIGTERM');
  });

  it('lets the task into the database security group on the database port', () => {
    password.hasResourceProperties('AWS::EC2::SecurityGroupIngress', {
      GroupId: 'sg-0db',
      FromPort: 5432,
      ToPort: 5432,
      IpProtocol: 'tcp',
      SourceSecurityGroupId: Match.anyValue(),
    });
  });
});

describe('secrets and authentication', () => {
  it('injects the password from Secrets Manager, never into the config', () => {
    const c = container(password);
    assert.equal(c.Secrets.length, 1);
    assert.equal(c.Secrets[0].Name, 'PGPASSWORD');
    assert.ok(JSON.stringify(c.Secrets[0].ValueFrom).includes(`${SECRET}:password::`));
    const text = config(password);
    assert.ok(!/password|auth =/.test(text), text);
    assert.match(text, /^url = "postgres:\/\/walshore@trading\.cluster-x\.us-east-1\.rds\.amazonaws\.com:5432\/trading\?sslmode=verify-full&sslrootcert=\/etc\/walshore\/rds-global-bundle\.pem"$/m);
  });

  it('with IAM database authentication, has no secret and may connect as the database user only', () => {
    assert.equal(container(iamAuth).Secrets, undefined);
    const text = config(iamAuth);
    assert.match(text, /^auth = "iam"$/m);
    assert.match(text, /^region = "us-east-1"$/m);
    const connect = taskRoleStatements(iamAuth).filter((s) => s.Action === 'rds-db:connect');
    assert.equal(connect.length, 1);
    assert.equal(
      JSON.stringify(connect[0].Resource),
      JSON.stringify({ 'Fn::Join': ['', ['arn:', { Ref: 'AWS::Partition' }, ':rds-db:us-east-1:111111111111:dbuser:db-ABCDEFGHIJKL/walshore']] }),
    );
    assert.ok(!taskRoleStatements(password).some((s) => s.Action === 'rds-db:connect'));
  });

  it('refuses a deployment that would have no way to log in', () => {
    assert.throws(() => synth(props({ passwordSecretArn: undefined })), /passwordSecretArn/);
    assert.throws(() => synth(props({ iamAuth: true, passwordSecretArn: undefined })), /resourceId/);
  });
});

describe('the lake', () => {
  it('is a bucket encrypted with a rotated KMS key and bucket keys, TLS only, never public', () => {
    password.hasResourceProperties('AWS::KMS::Key', { EnableKeyRotation: true });
    password.hasResourceProperties('AWS::S3::Bucket', {
      BucketEncryption: {
        ServerSideEncryptionConfiguration: [
          {
            BucketKeyEnabled: true,
            ServerSideEncryptionByDefault: { SSEAlgorithm: 'aws:kms', KMSMasterKeyID: Match.anyValue() },
          },
        ],
      },
      PublicAccessBlockConfiguration: {
        BlockPublicAcls: true,
        BlockPublicPolicy: true,
        IgnorePublicAcls: true,
        RestrictPublicBuckets: true,
      },
    });
    password.hasResourceProperties('AWS::S3::BucketPolicy', {
      PolicyDocument: {
        Statement: Match.arrayWith([
          Match.objectLike({
            Effect: 'Deny',
            Action: 's3:*',
            Condition: { Bool: { 'aws:SecureTransport': 'false' } },
          }),
        ]),
      },
    });
  });

  it('aborts incomplete multipart uploads', () => {
    password.hasResourceProperties('AWS::S3::Bucket', {
      LifecycleConfiguration: {
        Rules: Match.arrayWith([
          Match.objectLike({ Status: 'Enabled', AbortIncompleteMultipartUpload: { DaysAfterInitiation: 1 } }),
        ]),
      },
    });
  });

  it('keeps versions, so that a wrong delete can be undone, and expires the old ones', () => {
    password.hasResourceProperties('AWS::S3::Bucket', {
      VersioningConfiguration: { Status: 'Enabled' },
      LifecycleConfiguration: {
        Rules: Match.arrayWith([
          Match.objectLike({
            Status: 'Enabled',
            NoncurrentVersionExpiration: { NoncurrentDays: 30 },
            ExpiredObjectDeleteMarker: true,
          }),
        ]),
      },
    });
  });

  it('is written with SSE-KMS under the key, by walshore itself', () => {
    const text = config(password);
    assert.match(text, /^sse = "aws:kms"$/m);
    assert.match(text, /^kms_key_id = "<\{"Fn::GetAtt":\["LakeKey[0-9A-F]+","Arn"\]\}>"$/m);
    assert.match(text, /^url = "s3:\/\/<\{"Ref":"Lake[0-9A-F]+"\}>\/cdc\/trading"$/m);
  });

  it('can be an existing bucket, given its key', () => {
    const t = synth(props({}, { bucketName: 'analytics-lake', bucketKmsKeyArn: 'arn:aws:kms:us-east-1:111111111111:key/abc' }));
    t.resourceCountIs('AWS::S3::Bucket', 0);
    t.resourceCountIs('AWS::KMS::Key', 0);
    assert.match(config(t), /^url = "s3:\/\/analytics-lake\/cdc\/trading"$/m);
    assert.throws(() => synth(props({}, { bucketName: 'analytics-lake' })), /bucketKmsKeyArn/);
  });

  it('has a Glue database and an Athena workgroup with encrypted results in the bucket', () => {
    password.hasResourceProperties('AWS::Glue::Database', { DatabaseInput: { Name: 'trading_cdc' } });
    assert.match(config(password), /^database = "trading_cdc"$/m);
    password.hasResourceProperties('AWS::Athena::WorkGroup', {
      Name: 'walshore-trading_cdc',
      WorkGroupConfiguration: {
        EnforceWorkGroupConfiguration: true,
        ResultConfiguration: {
          OutputLocation: { 'Fn::Join': ['', ['s3://', { Ref: Match.stringLikeRegexp('^Lake') }, '/athena-results/']] },
          EncryptionConfiguration: { EncryptionOption: 'SSE_KMS' },
        },
      },
    });
  });
});

describe('the task role', () => {
  it('has least privilege: the lake prefix, the Glue database and its tables, the key; nothing else', () => {
    const statements = taskRoleStatements(password);
    const bySid = Object.fromEntries(statements.map((s) => [s.Sid, s]));
    assert.deepEqual(Object.keys(bySid).sort(), ['GlueCatalog', 'LakeKey', 'LakeList', 'LakeObjects']);
    for (const s of statements) {
      assert.equal(s.Effect, 'Allow');
      const actions = [s.Action].flat();
      assert.ok(!actions.some((a: string) => a.endsWith('*')), `no wildcard action: ${actions}`);
      assert.notEqual(s.Resource, '*', `${s.Sid} is scoped`);
    }
    assert.deepEqual(bySid.LakeObjects.Action, ['s3:GetObject', 's3:PutObject', 's3:DeleteObject', 's3:AbortMultipartUpload']);
    assert.ok(JSON.stringify(bySid.LakeObjects.Resource).includes('/cdc/trading/*'));
    assert.deepEqual(bySid.LakeList.Condition, { StringLike: { 's3:prefix': ['cdc/trading', 'cdc/trading/*'] } });
    const glue = JSON.stringify(bySid.GlueCatalog.Resource);
    assert.ok(glue.includes(':catalog') && glue.includes(':database/trading_cdc') && glue.includes(':table/trading_cdc/*'), glue);
    assert.deepEqual(bySid.LakeKey.Action, ['kms:GenerateDataKey', 'kms:Decrypt']);
    assert.match(JSON.stringify(bySid.LakeKey.Resource), /"Fn::GetAtt":\["LakeKey[0-9A-F]+","Arn"\]/);
  });
});

describe('alarms', () => {
  const alarms = Object.values(password.findResources('AWS::CloudWatch::Alarm')).map((a: any) => a.Properties);
  const topic = Object.keys(password.findResources('AWS::SNS::Topic', { Properties: { DisplayName: 'walshore alarms' } }));

  it('watch RDS itself, so they fire even when walshore is dead', () => {
    for (const metric of ['OldestLogicalReplicationSlotLag', 'TransactionLogsDiskUsage']) {
      const a = alarms.find((a) => a.MetricName === metric);
      assert.ok(a, metric);
      assert.equal(a.Namespace, 'AWS/RDS');
      assert.deepEqual(a.Dimensions, [{ Name: 'DBInstanceIdentifier', Value: 'trading-1' }]);
      assert.equal(a.ComparisonOperator, 'GreaterThanThreshold');
    }
  });

  it("watch walshore's lag and readiness, and its silence", () => {
    const behind = alarms.find((a) => a.MetricName === 'Uncommitted');
    assert.equal(behind.Namespace, 'walshore');
    assert.equal(behind.Threshold, 300);
    assert.deepEqual(behind.Dimensions, [
      { Name: 'Database', Value: 'trading' },
      { Name: 'Slot', Value: 'walshore' },
    ]);
    const ready = alarms.find((a) => a.MetricName === 'Ready');
    assert.equal(ready.ComparisonOperator, 'LessThanThreshold');
    assert.equal(ready.TreatMissingData, 'breaching', 'no metrics at all means walshore is down');
    assert.match(config(password), /^emf = true$/m);
  });

  it('all go to the alarm topic, which mails the on-call address', () => {
    assert.equal(topic.length, 1);
    assert.equal(alarms.length, 4);
    for (const a of alarms) assert.deepEqual(a.AlarmActions, [{ Ref: topic[0] }]);
    password.hasResourceProperties('AWS::SNS::Subscription', { Protocol: 'email', Endpoint: 'oncall@example.com' });
  });
});

describe('the new-data topic', () => {
  it('hears of every commit record written under _walshore/commits/', () => {
    const topic = Object.keys(password.findResources('AWS::SNS::Topic', { Properties: { DisplayName: 'walshore new data' } }));
    assert.equal(topic.length, 1);
    password.hasResourceProperties('Custom::S3BucketNotifications', {
      NotificationConfiguration: {
        TopicConfigurations: [
          {
            Events: ['s3:ObjectCreated:*'],
            TopicArn: { Ref: topic[0] },
            Filter: { Key: { FilterRules: [{ Name: 'prefix', Value: 'cdc/trading/_walshore/commits/' }] } },
          },
        ],
      },
    });
  });
});
