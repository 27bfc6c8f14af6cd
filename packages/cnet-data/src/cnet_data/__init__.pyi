# The public names of cnet-data, written once: type checkers read them here, and `__init__.py`
# builds the lazy runtime exports from these same lines (lazy_loader.attach_stub).
from .batch import Batch as Batch
from .batch import Sample as Sample
from .batch import collate_samples as collate_samples
from .buckets import Bucket as Bucket
from .buckets import BucketConfig as BucketConfig
from .buckets import BucketTable as BucketTable
from .buckets import generate_buckets as generate_buckets
from .buckets import merge_small_buckets as merge_small_buckets
from .captions import caption_key as caption_key
from .dataset import AugmentConfig as AugmentConfig
from .dataset import ControlNetDataset as ControlNetDataset
from .dataset import SampleKey as SampleKey
from .epoch_tagged import EpochTagged as EpochTagged
from .geometry import CropPlan as CropPlan
from .geometry import plan_crop as plan_crop
from .index import DatasetIndex as DatasetIndex
from .index import IndexBuilder as IndexBuilder
from .sampler import BucketBatchSampler as BucketBatchSampler
from .scan import BadSamplesError as BadSamplesError
from .scan import ScanConfig as ScanConfig
from .scan import ScanReport as ScanReport
from .scan import scan as scan
from .shard_writer import ShardWriter as ShardWriter
from .sources import SourceConfig as SourceConfig

__version__: str
__all__: list[str]

def __dir__() -> list[str]: ...
