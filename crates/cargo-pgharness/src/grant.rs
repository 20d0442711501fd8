//! `cargo pgharness rds grant-sql`: the SQL a database owner runs once to create the IAM login,
//! and the IAM policy that lets the caller use it (and the SSM tunnel).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Rds {
    #[command(subcommand)]
    command: RdsCommand,
}

#[derive(clap::Subcommand)]
enum RdsCommand {
    /// Print the SQL (CREATE USER, GRANT rds_iam, CONNECT, CREATE) and the IAM policy JSON.
    GrantSql(GrantSql),
}

#[derive(clap::Args)]
struct GrantSql {
    /// The database user to create for IAM logins.
    #[arg(long)]
    user: String,
    /// The database the tests use.
    #[arg(long, default_value = "postgres")]
    database: String,
    /// The cluster's region.
    #[arg(long, default_value = "<region>")]
    region: String,
    /// The AWS account id.
    #[arg(long, default_value = "<account-id>")]
    account: String,
    /// The cluster's resource id (`cluster-ABCDEFGHIJKL…`, not its name).
    #[arg(long, default_value = "<cluster-resource-id>")]
    cluster_resource_id: String,
    /// The jumphost's instance id, to include SSM permissions.
    #[arg(long)]
    ssm_target: Option<String>,
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn sql(user: &str, database: &str) -> String {
    format!(
        "-- Run once, as the cluster's master user (or another role that may create roles):\n\
         CREATE USER {user} WITH LOGIN;\n\
         GRANT rds_iam TO {user};\n\
         GRANT CONNECT, CREATE ON DATABASE {database} TO {user};\n",
        user = ident(user),
        database = ident(database)
    )
}

fn policy(args: &GrantSql) -> serde_json::Value {
    // The resource is the cluster's *resource id* (cluster-…), not its name: with the name
    // the policy silently grants nothing.
    let mut statements = vec![serde_json::json!({
        "Sid": "PgharnessIamLogin",
        "Effect": "Allow",
        "Action": "rds-db:connect",
        "Resource": format!("arn:aws:rds-db:{}:{}:dbuser:{}/{}", args.region, args.account, args.cluster_resource_id, args.user),
    })];
    if let Some(target) = &args.ssm_target {
        statements.push(serde_json::json!({
            "Sid": "PgharnessSsmTunnel",
            "Effect": "Allow",
            "Action": "ssm:StartSession",
            "Resource": [
                format!("arn:aws:ec2:{}:{}:instance/{target}", args.region, args.account),
                format!("arn:aws:ssm:{}::document/AWS-StartPortForwardingSessionToRemoteHost", args.region),
            ],
        }));
        statements.push(serde_json::json!({
            "Sid": "PgharnessSsmOwnSessions",
            "Effect": "Allow",
            "Action": ["ssm:ResumeSession", "ssm:TerminateSession"],
            "Resource": format!("arn:aws:ssm:*:*:session/${{aws:userid}}-*"),
        }));
        statements.push(serde_json::json!({
            "Sid": "PgharnessDoctor",
            "Effect": "Allow",
            "Action": "ssm:DescribeInstanceInformation",
            "Resource": "*",
        }));
    }
    serde_json::json!({ "Version": "2012-10-17", "Statement": statements })
}

impl Rds {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            RdsCommand::GrantSql(args) => {
                print!("{}", sql(&args.user, &args.database));
                println!("\n-- IAM policy for the role that runs the tests (e.g. the CI role):");
                println!("{}", serde_json::to_string_pretty(&policy(&args))?);
                if args.cluster_resource_id.starts_with('<') {
                    eprintln!(
                        "\npgharness: find the cluster resource id with:\n  aws rds describe-db-clusters --db-cluster-identifier <name> --query 'DBClusters[0].DbClusterResourceId' --output text"
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(user: &str) -> GrantSql {
        GrantSql {
            user: user.into(),
            database: "app".into(),
            region: "eu-west-2".into(),
            account: "123456789012".into(),
            cluster_resource_id: "cluster-ABCDEFGHIJKL01234".into(),
            ssm_target: Some("i-0abc".into()),
        }
    }

    #[test]
    fn the_sql_quotes_names() {
        assert_eq!(
            sql("app\"iam", "my db"),
            "-- Run once, as the cluster's master user (or another role that may create roles):\nCREATE USER \"app\"\"iam\" WITH LOGIN;\nGRANT rds_iam TO \"app\"\"iam\";\nGRANT CONNECT, CREATE ON DATABASE \"my db\" TO \"app\"\"iam\";\n"
        );
    }

    #[test]
    fn the_policy_names_the_cluster_resource_id() {
        let policy = policy(&args("app_iam"));
        assert_eq!(
            policy["Statement"][0]["Resource"],
            "arn:aws:rds-db:eu-west-2:123456789012:dbuser:cluster-ABCDEFGHIJKL01234/app_iam"
        );
        assert_eq!(
            policy["Statement"][1]["Resource"][0],
            "arn:aws:ec2:eu-west-2:123456789012:instance/i-0abc"
        );
        assert_eq!(policy["Statement"].as_array().unwrap().len(), 4);
    }
}
