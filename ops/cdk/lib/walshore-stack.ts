// walshore beside an existing RDS or Aurora PostgreSQL database: one Fargate task
// replicating into an SSE-KMS bucket, registered in Glue, queried through an Athena
// workgroup, with alarms that fire even when walshore itself is down.
//
// The database, its VPC and security group are imported by attributes (no lookups), so
// `cdk synth` runs offline. test/walshore-stack.test.ts checks every resource below.

import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Annotations, ArnFormat, CfnOutput, Duration, RemovalPolicy, Stack, type StackProps } from 'aws-cdk-lib';
import * as athena from 'aws-cdk-lib/aws-athena';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as cwActions from 'aws-cdk-lib/aws-cloudwatch-actions';
import * as ec2 from 'aws-cdk-lib/aws-ec2';
import * as ecs from 'aws-cdk-lib/aws-ecs';
import * as glue from 'aws-cdk-lib/aws-glue';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as kms from 'aws-cdk-lib/aws-kms';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as s3 from 'aws-cdk-lib/aws-s3';
import * as s3n from 'aws-cdk-lib/aws-s3-notifications';
import * as secretsmanager from 'aws-cdk-lib/aws-secretsmanager';
import * as sns from 'aws-cdk-lib/aws-sns';
import * as subscriptions from 'aws-cdk-lib/aws-sns-subscriptions';
import type { Construct } from 'constructs';

/** The repository root: the Dockerfile the image is built from. */
export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** Where the image keeps the RDS CA bundle (Dockerfile). */
const RDS_CA = '/etc/walshore/rds-global-bundle.pem';

export interface DatabaseProps {
  /** Endpoint host name of the instance or cluster writer. */
  readonly host: string;
  readonly port?: number;
  /** The database to replicate. */
  readonly name: string;
  /** The role of sql/rds.sql. */
  readonly user: string;
  /** DBInstanceIdentifier, for the RDS alarms (Aurora: the writer instance). */
  readonly instanceIdentifier: string;
  /** The database's security group: walshore's task is let in on the port. */
  readonly securityGroupId: string;
  /** Secrets Manager secret with a "password" key (RDS-managed master secrets have one). */
  readonly passwordSecretArn?: string;
  /** IAM database authentication instead of a password. */
  readonly iamAuth?: boolean;
  /** The DbiResourceId (db-...) for rds-db:connect; required with iamAuth. */
  readonly resourceId?: string;
}

export interface WalshoreStackProps extends StackProps {
  readonly vpcId: string;
  readonly availabilityZones: string[];
  readonly privateSubnetIds: string[];
  readonly database: DatabaseProps;
  readonly publication?: string;
  readonly slot?: string;
  /** An existing lake bucket (with bucketKmsKeyArn); a new one is made when absent. */
  readonly bucketName?: string;
  readonly bucketKmsKeyArn?: string;
  /** How long the new bucket keeps overwritten and deleted objects' earlier versions
   * (a wrong delete can be undone meanwhile). Default 30 days. */
  readonly noncurrentVersionDays?: number;
  /** Prefix of the lake in the bucket. Default "cdc/<database name>". */
  readonly lakePrefix?: string;
  readonly glueDatabase?: string;
  /** Where the Dockerfile is. Default: the repository root. */
  readonly imageDirectory?: string;
  /** Subscribed to the alarm topic when given. */
  readonly alarmEmail?: string;
  /** OldestLogicalReplicationSlotLag alarm threshold. Default 10 GiB. */
  readonly slotLagAlarmBytes?: number;
  /** TransactionLogsDiskUsage alarm threshold. Default 20 GiB. */
  readonly transactionLogsAlarmBytes?: number;
}

const GiB = 1024 ** 3;

export class WalshoreStack extends Stack {
  readonly bucket: s3.IBucket;
  readonly key: kms.IKey;
  readonly taskRole: iam.Role;
  readonly alarmTopic: sns.Topic;
  readonly newDataTopic: sns.Topic;
  readonly service: ecs.FargateService;

  constructor(scope: Construct, id: string, props: WalshoreStackProps) {
    super(scope, id, props);
    const db = props.database;
    const port = db.port ?? 5432;
    const publication = props.publication ?? 'walshore';
    const slot = props.slot ?? 'walshore';
    const prefix = props.lakePrefix ?? `cdc/${db.name}`;
    const glueDatabase = props.glueDatabase ?? `${db.name}_cdc`;
    if (db.iamAuth && !db.resourceId) {
      throw new Error('database.iamAuth needs database.resourceId (the DbiResourceId, db-...) for rds-db:connect');
    }
    if (!db.iamAuth && !db.passwordSecretArn) {
      throw new Error('give database.passwordSecretArn (a Secrets Manager secret with a "password" key) or set iamAuth');
    }

    const vpc = ec2.Vpc.fromVpcAttributes(this, 'Vpc', {
      vpcId: props.vpcId,
      availabilityZones: props.availabilityZones,
      privateSubnetIds: props.privateSubnetIds,
    });
    // Nothing here reads the subnets' route tables.
    vpc.privateSubnets.forEach((s) => Annotations.of(s).acknowledgeWarning('@aws-cdk/aws-ec2:noSubnetRouteTableId'));

    // The lake: encrypted with a KMS key, TLS only, no public access, and no part
    // uploads left behind by a task killed mid-upload.
    if (props.bucketName) {
      if (!props.bucketKmsKeyArn) {
        throw new Error('an existing bucket needs bucketKmsKeyArn: walshore writes with SSE-KMS');
      }
      this.key = kms.Key.fromKeyArn(this, 'LakeKey', props.bucketKmsKeyArn);
      this.bucket = s3.Bucket.fromBucketName(this, 'Lake', props.bucketName);
    } else {
      this.key = new kms.Key(this, 'LakeKey', {
        description: `walshore lake of ${db.name}`,
        enableKeyRotation: true,
        removalPolicy: RemovalPolicy.RETAIN,
      });
      this.bucket = new s3.Bucket(this, 'Lake', {
        encryption: s3.BucketEncryption.KMS,
        encryptionKey: this.key,
        bucketKeyEnabled: true,
        enforceSSL: true,
        blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
        objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
        // A wrong delete (a bug, a mistaken command, a compromised role) can be undone
        // for the noncurrent versions' lifetime; walshore itself deletes only files no
        // commit names and log records folded into checkpoints.
        versioned: true,
        lifecycleRules: [
          { id: 'abort-incomplete-uploads', abortIncompleteMultipartUploadAfter: Duration.days(1) },
          {
            id: 'expire-noncurrent-versions',
            noncurrentVersionExpiration: Duration.days(props.noncurrentVersionDays ?? 30),
            expiredObjectDeleteMarker: true,
          },
        ],
        removalPolicy: RemovalPolicy.RETAIN,
      });
    }

    new glue.CfnDatabase(this, 'GlueDatabase', {
      catalogId: this.account,
      databaseInput: { name: glueDatabase, description: `PostgreSQL ${db.name} replicated by walshore` },
    });
    const workgroup = new athena.CfnWorkGroup(this, 'Athena', {
      name: `walshore-${glueDatabase}`,
      description: `Queries over the walshore lake of ${db.name}`,
      state: 'ENABLED',
      workGroupConfiguration: {
        enforceWorkGroupConfiguration: true,
        publishCloudWatchMetricsEnabled: true,
        resultConfiguration: {
          outputLocation: `s3://${this.bucket.bucketName}/athena-results/`,
          encryptionConfiguration: { encryptionOption: 'SSE_KMS', kmsKey: this.key.keyArn },
        },
      },
    });

    // The task role: the lake prefix, the Glue database and its tables, the key, the
    // database login with IAM authentication. Nothing else.
    this.taskRole = new iam.Role(this, 'TaskRole', {
      assumedBy: new iam.ServicePrincipal('ecs-tasks.amazonaws.com'),
      description: 'walshore: write the lake, register it in Glue',
    });
    this.taskRole.addToPolicy(
      new iam.PolicyStatement({
        sid: 'LakeObjects',
        actions: ['s3:GetObject', 's3:PutObject', 's3:DeleteObject', 's3:AbortMultipartUpload'],
        resources: [this.bucket.arnForObjects(`${prefix}/*`)],
      }),
    );
    this.taskRole.addToPolicy(
      new iam.PolicyStatement({
        sid: 'LakeList',
        actions: ['s3:ListBucket'],
        resources: [this.bucket.bucketArn],
        conditions: { StringLike: { 's3:prefix': [prefix, `${prefix}/*`] } },
      }),
    );
    this.taskRole.addToPolicy(
      new iam.PolicyStatement({
        sid: 'GlueCatalog',
        actions: [
          'glue:GetDatabase',
          'glue:GetTable',
          'glue:CreateTable',
          'glue:UpdateTable',
          // With [iceberg]: the Iceberg table replaces the current-state view of its name.
          'glue:DeleteTable',
          'glue:GetPartitions',
          'glue:BatchCreatePartition',
          // With [compaction]: a compacted partition's location moves to its new folder.
          'glue:UpdatePartition',
        ],
        resources: [
          this.formatArn({ service: 'glue', resource: 'catalog' }),
          this.formatArn({ service: 'glue', resource: 'database', resourceName: glueDatabase }),
          this.formatArn({ service: 'glue', resource: 'table', resourceName: `${glueDatabase}/*` }),
        ],
      }),
    );
    this.taskRole.addToPolicy(
      new iam.PolicyStatement({
        sid: 'LakeKey',
        actions: ['kms:GenerateDataKey', 'kms:Decrypt'],
        resources: [this.key.keyArn],
      }),
    );
    if (db.iamAuth) {
      this.taskRole.addToPolicy(
        new iam.PolicyStatement({
          sid: 'DatabaseLogin',
          actions: ['rds-db:connect'],
          resources: [
            this.formatArn({
              service: 'rds-db',
              resource: 'dbuser',
              resourceName: `${db.resourceId}/${db.user}`,
              arnFormat: ArnFormat.COLON_RESOURCE_NAME,
            }),
          ],
        }),
      );
    }

    // walshore's config, passed whole in one variable (no file to mount on Fargate).
    const config = [
      '[source]',
      `url = "postgres://${db.user}@${db.host}:${port}/${db.name}?sslmode=verify-full&sslrootcert=${RDS_CA}"`,
      // A password comes from PGPASSWORD, which ECS fills from Secrets Manager.
      ...(db.iamAuth ? ['auth = "iam"', `region = "${this.region}"`] : []),
      `publication = "${publication}"`,
      `slot = "${slot}"`,
      '',
      '[sink]',
      `url = "s3://${this.bucket.bucketName}/${prefix}"`,
      `region = "${this.region}"`,
      'sse = "aws:kms"',
      `kms_key_id = "${this.key.keyArn}"`,
      'flush_interval = "5s"',
      '',
      '[snapshot]',
      'mode = "initial"',
      '',
      '[catalog]',
      'kind = "glue"',
      `database = "${glueDatabase}"`,
      `region = "${this.region}"`,
      'create_views = true',
      '',
      '[metrics]',
      'listen = "127.0.0.1:9100"',
      'emf = true',
      '',
    ].join('\n');

    const logGroup = new logs.LogGroup(this, 'Logs', {
      retention: logs.RetentionDays.ONE_MONTH,
      removalPolicy: RemovalPolicy.RETAIN,
    });
    const task = new ecs.FargateTaskDefinition(this, 'Task', {
      cpu: 1024,
      memoryLimitMiB: 2048,
      taskRole: this.taskRole,
      runtimePlatform: {
        cpuArchitecture: ecs.CpuArchitecture.X86_64,
        operatingSystemFamily: ecs.OperatingSystemFamily.LINUX,
      },
    });
    const secrets: Record<string, ecs.Secret> = {};
    if (!db.iamAuth && db.passwordSecretArn) {
      const secret = secretsmanager.Secret.fromSecretCompleteArn(this, 'DatabasePassword', db.passwordSecretArn);
      secrets.PGPASSWORD = ecs.Secret.fromSecretsManager(secret, 'password');
    }
    task.addContainer('walshore', {
      image: ecs.ContainerImage.fromAsset(props.imageDirectory ?? REPO_ROOT),
      command: ['run', '--config', 'env:WALSHORE_CONFIG'],
      environment: { WALSHORE_CONFIG: config, WALSHORE_LOG: 'info' },
      secrets,
      logging: ecs.LogDrivers.awsLogs({ logGroup, streamPrefix: 'walshore' }),
      healthCheck: {
        command: ['CMD', '/usr/local/bin/walshore', 'health', '--config', 'env:WALSHORE_CONFIG'],
        interval: Duration.seconds(30),
        timeout: Duration.seconds(10),
        retries: 3,
        startPeriod: Duration.minutes(2),
      },
      // SIGTERM finishes the open flush and commits it; give it the time.
      stopTimeout: Duration.seconds(120),
    });

    const cluster = new ecs.Cluster(this, 'Cluster', { vpc });
    const taskSg = new ec2.SecurityGroup(this, 'TaskSecurityGroup', {
      vpc,
      description: 'walshore task',
      allowAllOutbound: true,
    });
    const dbSg = ec2.SecurityGroup.fromSecurityGroupId(this, 'DatabaseSecurityGroup', db.securityGroupId);
    dbSg.addIngressRule(taskSg, ec2.Port.tcp(port), 'walshore replication');
    // Exactly one task: a second one would be fenced off by the lake's commit log, and
    // a rolling deployment would start it. Stop the old task, then start the new.
    this.service = new ecs.FargateService(this, 'Service', {
      cluster,
      taskDefinition: task,
      desiredCount: 1,
      minHealthyPercent: 0,
      maxHealthyPercent: 100,
      circuitBreaker: { enable: true, rollback: true },
      vpcSubnets: { subnets: vpc.privateSubnets },
      securityGroups: [taskSg],
      assignPublicIp: false,
    });

    // Alarms. RDS's own metrics fire even when walshore is dead: a slot that nobody
    // reads holds WAL until the disk fills.
    this.alarmTopic = new sns.Topic(this, 'Alarms', { displayName: 'walshore alarms' });
    if (props.alarmEmail) {
      this.alarmTopic.addSubscription(new subscriptions.EmailSubscription(props.alarmEmail));
    }
    const rds = (metricName: string) =>
      new cloudwatch.Metric({
        namespace: 'AWS/RDS',
        metricName,
        dimensionsMap: { DBInstanceIdentifier: db.instanceIdentifier },
        statistic: 'Maximum',
        period: Duration.minutes(5),
      });
    const walshore = (metricName: string, statistic: string) =>
      new cloudwatch.Metric({
        namespace: 'walshore',
        metricName,
        dimensionsMap: { Database: db.name, Slot: slot },
        statistic,
        period: Duration.minutes(1),
      });
    const alarms = [
      rds('OldestLogicalReplicationSlotLag').createAlarm(this, 'SlotLagAlarm', {
        alarmDescription: `The oldest replication slot on ${db.instanceIdentifier} holds WAL: is walshore running and keeping up?`,
        threshold: props.slotLagAlarmBytes ?? 10 * GiB,
        evaluationPeriods: 3,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      }),
      rds('TransactionLogsDiskUsage').createAlarm(this, 'TransactionLogsAlarm', {
        alarmDescription: `WAL on ${db.instanceIdentifier} is filling its storage`,
        threshold: props.transactionLogsAlarmBytes ?? 20 * GiB,
        evaluationPeriods: 3,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      }),
      walshore('Uncommitted', 'Maximum').createAlarm(this, 'SinkBehindAlarm', {
        alarmDescription: 'walshore received changes that have waited over 5 minutes for the lake',
        threshold: 300,
        evaluationPeriods: 3,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      }),
      walshore('Ready', 'Minimum').createAlarm(this, 'NotReadyAlarm', {
        alarmDescription: 'walshore has not been ready (connected and committing) for 10 minutes, or sends no metrics',
        threshold: 1,
        evaluationPeriods: 10,
        comparisonOperator: cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
        treatMissingData: cloudwatch.TreatMissingData.BREACHING,
      }),
    ];
    for (const alarm of alarms) {
      alarm.addAlarmAction(new cwActions.SnsAction(this.alarmTopic));
      alarm.addOkAction(new cwActions.SnsAction(this.alarmTopic));
    }

    // New data: one S3 event per commit record, which names the files it made visible.
    this.newDataTopic = new sns.Topic(this, 'NewData', { displayName: 'walshore new data' });
    this.bucket.addEventNotification(s3.EventType.OBJECT_CREATED, new s3n.SnsDestination(this.newDataTopic), {
      prefix: `${prefix}/_walshore/commits/`,
    });

    new CfnOutput(this, 'LakeUrl', { value: `s3://${this.bucket.bucketName}/${prefix}` });
    new CfnOutput(this, 'GlueDatabaseName', { value: glueDatabase });
    new CfnOutput(this, 'AthenaWorkGroup', { value: workgroup.name });
    new CfnOutput(this, 'AlarmTopicArn', { value: this.alarmTopic.topicArn });
    new CfnOutput(this, 'NewDataTopicArn', { value: this.newDataTopic.topicArn });
  }
}
