# Helpers of rules/embed.smk (Snakemake's linter wants functions and rules in separate files).

PUBLIC_SHARDS = [f"{i}-of-{config['embedding']['public_shards']}" for i in range(config["embedding"]["public_shards"])]


def embed_execution_flags():
    emb = config["embedding"]
    return execution_flags(
        batch_size=emb["batch_size"], device=emb["device"], allow_cpu_fallback=str(emb["allow_cpu_fallback"]).lower()
    )
