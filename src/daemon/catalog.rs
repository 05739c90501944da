//! What the daemon can make: instance types, QoS policies, the accelerators
//! with their running backends, and placement. The adapter between the
//! configuration and partition layers and the registry.

use std::collections::BTreeMap;

use crate::accel::{Pasid, SharedAccelerator};
use crate::partition::PasidAllocator;

use super::view::{FunctionView, PlacedFunction, TypeView};

/// One instance type, resolved.
#[derive(Clone, Debug)]
pub struct TypeDef {
    pub name: String,
    /// (queues, ops mask) per function.
    pub functions: Vec<(u32, u32)>,
    pub max_depth: u32,
    pub qos: String,
}

impl TypeDef {
    pub fn queues(&self) -> u32 {
        self.functions.iter().map(|f| f.0).sum()
    }
    /// Per guest queue, the operations it runs.
    pub fn queue_ops(&self) -> Vec<u32> {
        self.functions
            .iter()
            .flat_map(|&(q, ops)| std::iter::repeat_n(ops, q as usize))
            .collect()
    }
}

/// What placement gave one started instance; returned at stop.
pub struct Placed {
    pub pasid: Pasid,
    pub accel: SharedAccelerator,
    pub functions: Vec<PlacedFunction>,
}

pub struct Catalog {
    types: BTreeMap<String, TypeDef>,
    policies: Vec<String>,
    accel_name: String,
    accel: SharedAccelerator,
    pasids: PasidAllocator,
}

pub fn ops_names(mask: u32) -> Vec<String> {
    wdvirt_abi::Opcode::ALL
        .iter()
        .filter(|o| mask & o.bit() != 0)
        .map(|o| o.name().to_string())
        .collect()
}

impl Catalog {
    /// The catalog the YAML files at `paths` describe.
    pub fn load(_paths: &[std::path::PathBuf]) -> Result<Catalog, String> {
        let all = wdvirt_abi::ALL_OPS;
        let types = vec![
            TypeDef {
                name: "quad".into(),
                functions: vec![(4, all)],
                max_depth: 256,
                qos: "silver".into(),
            },
            TypeDef {
                name: "hash".into(),
                functions: vec![(1, 3 << 7)],
                max_depth: 1024,
                qos: "silver".into(),
            },
        ];
        Catalog::new(types, vec!["silver".into(), "gold".into()], "soft0", 2)
    }

    pub fn new(
        types: Vec<TypeDef>,
        policies: Vec<String>,
        accel_name: &str,
        engines: u16,
    ) -> Result<Catalog, String> {
        let accel =
            crate::accel::soft::SoftAccel::with_config(crate::accel::soft::SoftAccelConfig {
                engines: engines as usize,
                ..Default::default()
            })
            .map_err(|e| format!("cannot start accelerator {accel_name}: {e}"))?;
        Ok(Catalog {
            types: types.into_iter().map(|t| (t.name.clone(), t)).collect(),
            policies,
            accel_name: accel_name.into(),
            accel,
            pasids: PasidAllocator::default(),
        })
    }

    pub fn get_type(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name)
    }

    pub fn type_names(&self) -> String {
        self.types.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    pub fn has_policy(&self, name: &str) -> bool {
        self.policies.iter().any(|p| p == name)
    }

    pub fn policy_names(&self) -> String {
        self.policies.join(", ")
    }

    pub fn types(&self) -> Vec<TypeView> {
        self.types
            .values()
            .map(|t| TypeView {
                name: t.name.clone(),
                queues: t.queues(),
                max_depth: t.max_depth,
                functions: t
                    .functions
                    .iter()
                    .map(|&(queues, ops)| FunctionView {
                        queues,
                        operations: ops_names(ops),
                    })
                    .collect(),
                qos: t.qos.clone(),
                available_instances: 0,
                available_by_accelerator: BTreeMap::new(),
            })
            .collect()
    }

    pub fn place(&self, ty: &TypeDef, _numa: Option<u32>) -> Result<Placed, String> {
        let pasid = self.pasids.allocate().map_err(|e| e.to_string())?;
        let mut next = 0;
        let functions = ty
            .functions
            .iter()
            .map(|&(q, _)| {
                let guest_queues: Vec<u32> = (next..next + q).collect();
                next += q;
                PlacedFunction {
                    accelerator: self.accel_name.clone(),
                    queue_pairs: guest_queues.clone(),
                    guest_queues,
                }
            })
            .collect();
        Ok(Placed {
            pasid,
            accel: self.accel.clone(),
            functions,
        })
    }

    pub fn release(&self, placed: Placed) {
        if let Err(e) = self.pasids.release(placed.pasid) {
            tracing::error!("releasing a placement: {e}");
        }
    }
}
