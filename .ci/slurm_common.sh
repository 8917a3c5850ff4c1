# Sourced by .ci/slurm_up.sh and .ci/multinode_up.sh: what their SLURM clusters share.

# The slurm.conf settings of both clusters: a container without cgroups (proctrack/linuxproc, task/none), more
# declared CPUs than the hardware has (config_overrides), count-only GPUs, requeueable jobs, and MpiDefault=none
# (SLURM's default), so the job scripts must pass --mpi to srun themselves.
slurm_conf_common() {
    cat <<'CONF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
JobRequeue=1
MpiDefault=none
GresTypes=gpu
CONF
}
